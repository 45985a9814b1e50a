"""The whole workflow on a two-node Ray cluster whose nodes share no files, as nodes of a
real cluster share no disk: the worker node runs in a mount namespace of its own where
/tmp (every test folder, Ray's session folder, uniloom's per-node scratch) and /dev/shm
are empty tmpfs (tests/integration/localcluster.py). The workspace is a bucket on a moto
S3 server and MLflow a tracking server, both on 127.0.0.1. `uniloom submit -- run` runs
every stage there, unified training with one worker on each node (expert parallel across
them); the worker node is lost mid-training and a new one joins, and training resumes
from the checkpoint in the bucket. The bucket's run equals the quickstart's local one
(the same budgets: the same stages and rows, every written row in the bucket's shards),
and a rerun from this machine skips every stage."""

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pyarrow.dataset as pads
import pytest
import s3fs
import yaml
from localcluster import BIN, LocalCluster
from mlflowserver import MlflowServer
from workflowrun import BUDGETS, STAGES

from uniloom.pipelines.config import load_config
from uniloom.pipelines.workspace import scratch

pytestmark = pytest.mark.integration

BUCKET = "share-nothing"
PRIVATE = ("/tmp", "/dev/shm")
# 2 CPUs a node and 1.5 a training worker: the two workers cannot share a node
CLUSTER_SETS = ["train.cpus_per_worker=1.5"]
STEPS = 10  # the budgets' align 3 + joint 3 + sft 2 + edit 2


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, quickstart):
    """The two-node cluster, started after the quickstart's local run (which the bucket's
    run is compared with) so that the local run never meets a cluster on this machine."""
    c = LocalCluster(tmp_path_factory.mktemp("share-nothing"), cpus_per_node=2, private=PRIVATE)
    try:
        yield c.start()
    finally:
        c.stop()
    assert c.pids() == []


def on_worker_node(cluster: LocalCluster, script: str) -> subprocess.CompletedProcess:
    """`sh -c script` in the newest worker node's mount namespace."""
    pid = cluster.pids({cluster.workers[-1]})[0]
    return subprocess.run(["nsenter", f"--target={pid}", "--mount", "--", "sh", "-c", script],
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def test_the_worker_node_sees_none_of_the_heads_files(cluster, tmp_path):
    """A file written in /tmp or /dev/shm on the head's side is not on the worker node, nor
    the other way round; the venv stays readable (installed software, not shared state)."""
    head_file, shm = tmp_path / "head-file", Path(f"/dev/shm/uniloom-head-{cluster.gcs_port}")
    worker_file = Path(f"/tmp/uniloom-worker-{cluster.gcs_port}")
    head_file.write_text("head")
    shm.write_text("head")
    try:
        seen = on_worker_node(
            cluster, f"cat {head_file} {shm}; touch {worker_file}; test -x {sys.executable}"
        )
    finally:
        shm.unlink()
    assert seen.returncode == 0 and seen.stderr.count("No such file") == 2, seen.stderr
    assert not worker_file.exists()
    addresses = cluster.listening_addresses()
    assert addresses and addresses <= {"127.0.0.1", "[::ffff:127.0.0.1]"}, addresses


def registered(fs: s3fs.S3FileSystem, workspace: str) -> list[str]:
    """The unified run's checkpoints Ray Train has registered (what a restart restores)."""
    snapshots = fs.glob(f"{workspace}/ray_results/univision-*/checkpoint_manager_snapshot.json")
    try:
        return [r["checkpoint_dir_name"] for r in json.loads(fs.cat_file(snapshots[0]))["checkpoint_results"]]
    except (IndexError, FileNotFoundError, ValueError):  # not there yet, or being rewritten
        return []


def ray_list(cluster: LocalCluster, *args: str) -> list[dict]:
    out = subprocess.run(
        [str(BIN / "ray"), "list", *args, f"--address=127.0.0.1:{cluster.gcs_port}", "--format=json", "--detail"],
        env={**cluster.env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_the_workflow_runs_on_nodes_that_share_no_files_and_survives_a_lost_node(
    cluster, quickstart, s3_server, tmp_path, cli, report
):
    fs = s3fs.S3FileSystem(**s3_server, use_listings_cache=False)  # polled for new files
    fs.mkdir(BUCKET)
    workspace = f"{BUCKET}/ws"
    server = MlflowServer(tmp_path / "mlflow", "alice", "password-of-alice").start()
    endpoint = s3_server["endpoint_url"]
    env_vars = {
        "AWS_ENDPOINT_URL": endpoint, "MLFLOW_S3_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": s3_server["key"], "AWS_SECRET_ACCESS_KEY": s3_server["secret"],
        "MLFLOW_TRACKING_URI": server.uri(), "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    }  # fmt: skip
    # the head's scratch for this workspace (the driver runs there): logs, never shared state
    head_scratch = scratch(load_config("tiny", overrides=[f"workspace=s3://{workspace}"]))
    shutil.rmtree(head_scratch, ignore_errors=True)
    runtime_env = tmp_path / "runtime_env.yaml"
    runtime_env.write_text(yaml.safe_dump({"env_vars": env_vars}))
    first_nodes, lost, done = cluster.alive_node_ids(), {}, threading.Event()

    def lose_the_worker_node_mid_training():
        while not (checkpoints := registered(fs, workspace)):
            if done.wait(0.5):
                return
        lost["checkpoint"] = checkpoints[-1]
        cluster.kill_worker()
        cluster.start_worker()

    killer = threading.Thread(target=lose_the_worker_node_mid_training, daemon=True)
    killer.start()
    sets = [arg for budget in [*BUDGETS, *CLUSTER_SETS] for arg in ("--set", budget)]
    started = time.perf_counter()
    try:
        result = cli(
            "submit", "--address", cluster.address, "--token-path", str(cluster.token_path),
            "--runtime-env", str(runtime_env), "--", "run", "--workspace", f"s3://{workspace}", *sets, "--json",
            timeout=780,  # under the suite's 900-s limit per test
        )  # fmt: skip
        seconds = round(time.perf_counter() - started, 1)
        done.set()
        killer.join(timeout=300)  # the new worker node is up
        nodes, actors = ray_list(cluster, "nodes"), ray_list(cluster, "actors", "--limit=10000")
        models = {m.name for m in mlflow.MlflowClient(server.uri()).search_registered_models()}
        # run again from this machine on the same bucket and tracking server
        again = cli("run", "--workspace", f"s3://{workspace}", *sets, "--json", cwd=tmp_path, env=env_vars)
    finally:
        done.set()
        server.stop()
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    summary = json.loads(next(line for line in reversed(result.stdout.splitlines()) if line.startswith('{"')))
    assert summary["ran"] == STAGES
    assert again.returncode == 0, again.stderr[-3000:]
    rerun = json.loads(again.stdout.strip().splitlines()[-1])
    assert rerun["skipped"] == STAGES and rerun["ran"] == []

    # the same rows as the quickstart's run in a local folder, with the same budgets
    local = json.loads((quickstart[0] / "ws" / "workflow.json").read_text())["stages"]
    first = {f"{stage}.{k}": v for stage, state in local.items() for k, v in state["metrics"].items()}
    rows = ("corpus.corpus_samples", "corpus.corpus_shards", "data.read", "data.written", "data.quarantined")
    assert sorted(local) == sorted(STAGES)
    assert {k: summary["metrics"][k] for k in rows} == {k: first[k] for k in rows}
    for name, path in (("data.shards", "data"), ("train.export", "univision/univision.safetensors"),
                       ("tokenizer.weights", "mingtok/mingtok.safetensors")):  # fmt: skip
        assert summary["outputs"][name] == f"s3://{workspace}/{path}"
    # the data stage's shards and manifest are in the bucket, every written row in them
    table = pads.dataset(f"{workspace}/data/shards", filesystem=fs).to_table()
    assert table.num_rows == summary["metrics"]["data.written"] and fs.exists(
        f"{workspace}/data/_manifest.json"
    )
    assert len(fs.ls(f"{workspace}/corpus")) >= summary["metrics"]["corpus.corpus_shards"]

    # the worker node was lost after a checkpoint and before the end; the restarted group
    # (the head and the new worker node) restored that checkpoint from the bucket
    assert "checkpoint" in lost, "no checkpoint of the unified run was registered"
    killed_at = int(lost["checkpoint"].split("-")[1])
    metas = sorted(fs.glob(f"{workspace}/ray_results/univision-*/ckpt-*/meta.json"))
    meta = json.loads(fs.cat_file(metas[-1]))
    assert 0 < killed_at < STEPS and meta["global_step"] == STEPS, (killed_at, meta["global_step"])
    assert len(meta["resumes"]) == 1 and meta["resumes"][0]["global_step"] >= killed_at, meta["resumes"]
    assert (meta["world"], meta["ep"]) == (2, 2)  # one worker a node, the experts split over both

    # training workers ran on all three nodes: the first group on the head and the lost
    # node (1.5 CPUs each of a node's 2), the second on the head and the new node
    dead = {n["node_id"] for n in nodes if n["state"] == "DEAD"}
    assert len(nodes) == 3 and len(dead) == 1 and dead < first_nodes
    trained_on = {a["node_id"] for a in actors if a["class_name"] == "RayTrainWorker"}
    assert trained_on == {n["node_id"] for n in nodes}, (trained_on, nodes)

    assert models == {"uniloom-mingtok", "uniloom-univision"}
    stored = fs.find(workspace)
    for folder in ("workflow/", "corpus/", "mingtok/", "data/shards/", "univision/", "mlartifacts/"):
        assert any(f"{workspace}/{folder}" in p for p in stored), folder
    assert not any(p.is_file() for p in (server.root / "artifacts").rglob("*"))  # all in the bucket
    kept = [p for p in head_scratch.rglob("*") if p.suffix in (".tar", ".parquet", ".safetensors")]
    assert not kept, kept  # what was published or read is not left on the node
    report(f"uniloom submit -- run, two share-nothing nodes, worker node lost at {lost['checkpoint']}: "
           f"{seconds} s (training resumed at step {meta['resumes'][0]['global_step']} of {STEPS}); "
           f"rerun from this machine: every stage skipped in {rerun['seconds']} s")  # fmt: skip
