import json
import os
import tarfile

import pytest

ROOT = os.geteuid() == 0
# Root ignores directory permissions; dropping every capability makes it an ordinary owner.
DROP_CAPS = ("setpriv", "--bounding-set=-all", "--inh-caps=-all") if ROOT else ()


def test_help_lists_commands_and_each_takes_help(cli):
    out = cli("--help")
    assert out.returncode == 0 and "corpus" in out.stdout
    for sub in (["corpus", "--help"], ["corpus", "synth", "--help"], ["corpus", "photos", "--help"]):
        assert cli(*sub).returncode == 0


def test_synth_2000_samples_8_shards_json_summary(cli, tmp_path, report):
    out = cli(
        "corpus", "synth", "--out", str(tmp_path), "--num", "2000", "--shards", "8", "--size", "64", "--json"
    )
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    report(f"corpus synth 2000 x 64px in 8 shards: {summary['seconds']} s")
    assert summary["samples"] == 2000
    tars = sorted(tmp_path.glob("*.tar"))
    assert len(tars) == 8
    total = 0
    for path in tars:
        with tarfile.open(path) as tar:
            # source images ({key}.png), not the edit targets ({key}.tgt<r>.png)
            total += sum(1 for n in tar.getnames() if n.split(".", 1)[1] == "png")
    assert total == 2000


@pytest.mark.parametrize(
    "args, message",
    [
        (["--num", "0"], "--num must be at least 1"),
        (["--preset", "nope"], "unknown preset 'nope'"),
        (["--set", "corpus.seeed=1"], "unknown config key 'corpus.seeed'"),
        (["--num", "many"], "'many' is not a valid integer"),
    ],
)
def test_bad_arguments_give_one_line_and_nonzero_exit(cli, tmp_path, args, message):
    out = cli("corpus", "synth", "--out", str(tmp_path / "c"), *args)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in out.stderr


def test_unwritable_output_directory_is_one_clear_line(cli, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    for out_dir, message in ((locked / "sub", "cannot create output directory"), (locked, "is not writable")):
        out = cli("corpus", "synth", "--out", str(out_dir), "--num", "3", "--shards", "1", prefix=DROP_CAPS)
        assert out.returncode != 0
        assert out.stderr.strip().splitlines() == [out.stderr.strip()] and message in out.stderr
