"""`uniloom submit` against a real two-node Ray cluster on loopback."""

import json

import pytest
from localcluster import LocalCluster

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(tmp_path_factory.mktemp("cluster"))
    try:
        yield c.start()
    finally:  # a cluster that failed to start still stops what it started
        c.stop()
    assert c.pids() == []


def test_cluster_has_two_nodes_and_listens_on_loopback_only(cluster):
    import subprocess
    import time

    # `ray status` reports the autoscaler's view, which learns of a node a few seconds
    # after the GCS does (LocalCluster.start waits on the GCS): poll it.
    deadline = time.time() + 60
    while True:
        out = subprocess.run(
            [
                str(cluster.env["PATH"].split(":")[0] + "/ray"),
                "status",
                f"--address=127.0.0.1:{cluster.gcs_port}",
            ],
            env={**cluster.env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        if out.stdout.count("node_") == 2 or time.time() > deadline:
            break
        time.sleep(1)
    assert out.stdout.count("node_") == 2, out.stdout + out.stderr
    addresses = cluster.listening_addresses()
    assert addresses and addresses <= {"127.0.0.1", "[::ffff:127.0.0.1]"}, addresses


def test_submitted_job_runs_uploaded_code_and_writes_output(cluster, cli, tmp_path):
    out_dir = tmp_path / "corpus"
    result = cli(
        "submit", "--address", cluster.address, "--token-path", str(cluster.token_path), "--json", "--",
        "corpus", "synth", "--out", str(out_dir), "--num", "12", "--shards", "2", "--size", "32",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["status"] == "SUCCEEDED"
    assert "py_modules_files" in result.stdout or "Running entrypoint" in result.stdout
    assert len(list(out_dir.glob("*.tar"))) == 2


def test_a_submitted_job_runs_the_tiny_data_stage_on_the_cluster(cluster, cli, tmp_path):
    """The uploaded project's data stage runs inside the job, on the cluster's Ray."""
    import pyarrow.parquet as pq

    from uniloom.pipelines.config import CorpusConfig, load_config
    from uniloom.pipelines.corpus.synth import synthesize
    from uniloom.pipelines.data.image_tokenizer import save_random_weights

    synthesize(CorpusConfig(num=24, shards=2, size=64, seed=3), tmp_path / "corpus")
    weights = save_random_weights(load_config("tiny").mingtok, str(tmp_path / "mingtok.safetensors"))
    result = cli(
        "submit", "--address", cluster.address, "--token-path", str(cluster.token_path), "--json", "--",
        "data", "run", "--input", str(tmp_path / "corpus"), "--output", str(tmp_path / "shards"),
        "--set", f"data.tokenizer_weights={weights}", "--set", f"workspace={tmp_path / 'ws'}",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["status"] == "SUCCEEDED"
    table = pq.read_table([str(p) for p in sorted((tmp_path / "shards" / "shards").glob("*.parquet"))])
    assert table.num_rows == 24 and len(set(table.column("key").to_pylist())) == 24


def test_failing_job_exits_nonzero_and_bad_token_is_refused(cluster, cli, tmp_path):
    failed = cli("submit", "--address", cluster.address, "--token-path", str(cluster.token_path), "--",
                 "corpus", "synth", "--out", str(tmp_path), "--num", "0")  # fmt: skip
    assert failed.returncode != 0 and "--num must be at least 1" in failed.stdout
    bad = tmp_path / "bad_token"
    bad.write_text("0" * 64)
    refused = cli("submit", "--address", cluster.address, "--token-path", str(bad), "--", "corpus", "--help")
    assert refused.returncode != 0 and "Traceback" not in refused.stderr


def test_no_wait_returns_while_the_job_runs_and_prints_how_to_follow_and_stop_it(cluster, cli, tmp_path):
    """The job renders far more scenes than the test waits for: the call returns while it
    runs, and the `ray job stop` line it printed stops it."""
    import subprocess
    import time

    from ray.job_submission import JobStatus, JobSubmissionClient

    result = cli(
        "submit", "--address", cluster.address, "--token-path", str(cluster.token_path), "--no-wait", "--json",
        "--", "corpus", "synth", "--out", str(tmp_path / "corpus"), "--num", "500000", "--shards", "1",
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    job_id = summary["job_id"]
    assert summary["status"] in ("PENDING", "RUNNING")
    client = JobSubmissionClient(
        cluster.address, headers={"Authorization": f"Bearer {cluster.token_path.read_text()}"}
    )
    assert not client.get_job_status(job_id).is_terminal()
    hints = dict(line.split(": ", 1) for line in result.stdout.splitlines() if line.endswith(job_id))
    assert f"ray job logs --follow --address {cluster.address} {job_id}" in hints["follow it"]
    bare_env = {k: v for k, v in cluster.env.items() if not k.startswith("RAY_AUTH")}  # the hint sets them
    stop = subprocess.run(
        hints["stop it"].strip(), shell=True, env=bare_env, capture_output=True, text=True, timeout=120
    )
    assert stop.returncode == 0, stop.stdout + stop.stderr
    deadline = time.time() + 60
    while client.get_job_status(job_id) != JobStatus.STOPPED and time.time() < deadline:
        time.sleep(1)
    assert client.get_job_status(job_id) == JobStatus.STOPPED
