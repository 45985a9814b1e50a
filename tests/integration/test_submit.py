"""`uniloom submit` against a real two-node Ray cluster on loopback."""

import json

import pytest
from localcluster import LocalCluster

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(tmp_path_factory.mktemp("cluster")).start()
    yield c
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
