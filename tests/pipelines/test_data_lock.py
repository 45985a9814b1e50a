"""One data run per output: the lease `<output>/_lock.json`, on a local disk and on S3
(moto's server on 127.0.0.1, through s3fs), and what a second run sees."""

import json
import socket
import subprocess
import sys
import time

import pytest

from uniloom.pipelines.config import CorpusConfig, UniloomConfig
from uniloom.pipelines.data import lock as lock_module
from uniloom.pipelines.data.lock import OutputLock
from uniloom.pipelines.data.runner import run
from uniloom.pipelines.errors import UniloomError


@pytest.fixture(scope="module")
def s3(s3_server):
    import s3fs

    s3fs.S3FileSystem(**s3_server).mkdir("lock-bucket")
    return s3_server


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path, monkeypatch):
    """(output URL, storage options) on each kind of filesystem."""
    if request.param == "local":
        return str(tmp_path / "out"), {}
    monkeypatch.setattr(lock_module, "SETTLE_S", 0.05)
    return f"s3://lock-bucket/{tmp_path.name}", request.getfixturevalue("s3")


def plant(lock: OutputLock, **fields) -> None:
    """A lease left by some other run."""
    lease = {"owner": "f" * 32, "host": "other-host", "pid": 4242, "expires": time.time() + 60, **fields}
    lock.fs.makedirs(lock.root, exist_ok=True)
    lock.fs.pipe_file(lock.path, json.dumps(lease).encode())


def test_a_second_writer_fails_naming_the_owner_until_the_first_releases(output):
    uri, options = output
    first = OutputLock(uri, options).acquire()
    with pytest.raises(UniloomError) as e:
        OutputLock(uri, options).acquire()
    message = str(e.value)
    assert "is being written by another `uniloom data run`" in message
    assert f"run {first.id[:12]} on host {socket.gethostname()}" in message and "pid" in message
    assert "_lock.json" in message
    first.check()
    first.release()
    assert not first.fs.exists(first.path)
    with OutputLock(uri, options) as second:
        second.check()


def test_an_expired_lease_is_taken_over_with_a_warning(output):
    uri, options = output
    lock = OutputLock(uri, options)
    plant(lock, expires=time.time() - 5)
    with pytest.warns(RuntimeWarning, match="on host other-host, pid 4242.*its lease expired"):
        lock.acquire()
    assert json.loads(lock.fs.cat_file(lock.path))["owner"] == lock.id
    lock.release()


def test_a_live_lease_of_another_host_is_not_taken(output):
    uri, options = output
    lock = OutputLock(uri, options)
    plant(lock)
    with pytest.raises(UniloomError, match="other-host, pid 4242 \\(lease expires in"):
        lock.acquire()
    assert json.loads(lock.fs.cat_file(lock.path))["owner"] == "f" * 32


def test_the_lease_of_a_dead_process_on_this_host_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = OutputLock(str(tmp_path / "out"))
    plant(lock, host=socket.gethostname(), pid=dead.pid)
    with pytest.warns(RuntimeWarning, match="its process is gone"):
        lock.acquire()
    lock.release()


def test_a_run_that_lost_its_lease_stops_before_committing(output):
    uri, options = output
    lock = OutputLock(uri, options).acquire()
    plant(lock)  # taken over while this run was stalled past its expiry
    with pytest.raises(UniloomError, match="no longer holds .*taken by run ffffffffffff on host other-host"):
        lock.check()
    lock.release()
    assert json.loads(lock.fs.cat_file(lock.path))["owner"] == "f" * 32  # not ours to delete


def test_the_lease_is_renewed_while_the_run_lasts(tmp_path, monkeypatch):
    monkeypatch.setattr(lock_module, "RENEW_S", 0.05)
    lock = OutputLock(str(tmp_path / "out")).acquire()
    first = json.loads(lock.fs.cat_file(lock.path))["expires"]
    time.sleep(0.5)
    assert json.loads(lock.fs.cat_file(lock.path))["expires"] > first
    lock.check()
    lock.release()


def test_run_on_a_held_output_fails_before_touching_it(tmp_path):
    out = tmp_path / "out"
    (out / "_tmp").mkdir(parents=True)
    (out / "_tmp" / "in-flight.parquet").write_bytes(b"the first run's")
    with OutputLock(str(out)):
        with pytest.raises(UniloomError, match="being written by another"):
            run(UniloomConfig(), [str(tmp_path / "corpus")], str(out))
    assert (out / "_tmp" / "in-flight.parquet").exists()


def test_the_cli_reports_a_held_output_in_one_line(cli, tmp_path):
    from uniloom.models.mingtok_config import MingTokConfig
    from uniloom.pipelines.corpus.synth import synthesize
    from uniloom.pipelines.data.image_tokenizer import save_random_weights

    synthesize(CorpusConfig(num=4, shards=1, size=32), tmp_path / "corpus")
    weights = save_random_weights(MingTokConfig(), str(tmp_path / "w.safetensors"))
    with OutputLock(str(tmp_path / "out")) as held:
        result = cli("data", "run", "--input", str(tmp_path / "corpus"), "--output", str(tmp_path / "out"),
                     "--set", f"data.tokenizer_weights={weights}", "--set", f"workspace={tmp_path / 'ws'}")  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert f"run {held.id[:12]} on host {socket.gethostname()}" in line and "being written by another" in line
    assert not (tmp_path / "ws").exists()  # failed before an MLflow run was recorded
