"""Progress lines and the bar drawn from them (pipelines/progress.py, pipelines/terminal.py)."""

import io

from uniloom.pipelines.progress import Progress, parse
from uniloom.pipelines.terminal import Bar


def test_a_progress_line_reads_back_as_printed_also_behind_a_ray_prefix():
    p = Progress("train", 120, 460, "steps", {"loss": "0.8302", "tokens/s": "2496", "stage": "align 120/300"})
    line = p.line()
    assert line == "[train] 120/460 steps, loss 0.8302, tokens/s 2496, stage align 120/300"
    assert parse(line) == p
    assert parse(f"(RayTrainWorker pid=4242) {line}\n") == p
    assert parse("[corpus] 80/320 samples") == Progress("corpus", 80, 320, "samples")


def test_other_lines_are_not_progress():
    for text in ("[train +6s] stage align done in 194.3 s", "[train] running: train the model",
                 "Reporting training result 1: metrics={'loss': 0.8}", "[tokenizer] step 40 held-out PSNR 30.1 dB",
                 "[data] 3/9 shards, committed"):  # fmt: skip
        assert parse(text) is None, text


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_the_bar_is_redrawn_in_place_and_ends_with_one_line():
    out = Terminal()
    bar = Bar(out, "train", "train the unified model", live=True)
    bar.started -= 10  # ten seconds of start-up before the first update
    bar.update(Progress("train", 0, 100, "steps"))
    bar.first = (bar.first[0] - 20, 0)  # then 50 steps in 20 s
    bar.update(Progress("train", 50, 100, "steps", {"loss": "0.5000"}))
    bar.close(31.0)
    frames = out.getvalue().split("\r")[1:]
    assert frames[0].startswith("[train] train the unified model (0s)")
    assert (
        "[##########..........]" in frames[-2]
        and "50/100 steps, 2.50 steps/s, loss 0.5000, ETA 20s" in frames[-2]
    )
    assert frames[-1] == "[train] done in 31.0 s (50/100 steps, loss 0.5000)\x1b[K\n"
    assert out.getvalue().count("\n") == 1  # redrawn frames are one line
