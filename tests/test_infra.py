"""infra/ manifests parse, every preset, command and file they name exists, and they are
secure by default: no secret written into them, no Ray dashboard open beyond loopback
without token auth."""

import copy
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from uniloom.pipelines.config import preset_names
from uniloom.pipelines.redact import is_secret_key

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
UNILOOM = str(Path(sys.executable).with_name("uniloom"))


def _docs(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _check_uniloom_command(command: str) -> None:
    args = shlex.split(command)
    assert args[0] == "uniloom", command
    if "--preset" in args:
        assert args[args.index("--preset") + 1] in preset_names(), command
    sub = [a for a in args[1:] if not a.startswith("-")][:1]
    out = subprocess.run([UNILOOM, *sub, "--help"], capture_output=True, text=True)
    assert out.returncode == 0, (command, out.stderr)


def test_every_yaml_manifest_parses():
    files = sorted(INFRA.rglob("*.yaml"))
    assert len(files) >= 5
    for path in files:
        assert _docs(path), path


def test_kuberay_manifests_name_real_presets_and_commands():
    cluster = _docs(INFRA / "kuberay" / "raycluster.yaml")[0]
    assert cluster["kind"] == "RayCluster"
    groups = cluster["spec"]["workerGroupSpecs"]
    assert any(
        "nvidia.com/gpu" in c["resources"]["limits"]
        for g in groups
        for c in g["template"]["spec"]["containers"]
    )
    job = _docs(INFRA / "kuberay" / "rayjob.yaml")[0]
    assert job["kind"] == "RayJob"
    _check_uniloom_command(job["spec"]["entrypoint"])
    yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    for text in (
        (INFRA / "kuberay" / "raycluster.yaml").read_text(),
        (INFRA / "cluster-launcher.yaml").read_text(),
    ):
        for command in re.findall(r"`(uniloom [^`]+)`", text):
            _check_uniloom_command(
                command.replace("uniloom submit --address http://<head-svc>:8265 -- ", "uniloom ")
            )


def test_cluster_launcher_and_mlflow_server():
    launcher = _docs(INFRA / "cluster-launcher.yaml")[0]
    assert launcher["head_node_type"] in launcher["available_node_types"]
    kinds = {d["kind"]: d for d in _docs(INFRA / "mlflow" / "mlflow.yaml")}
    assert {"Deployment", "StatefulSet", "Service", "ConfigMap"} <= set(kinds)
    args = " ".join(kinds["Deployment"]["spec"]["template"]["spec"]["containers"][0]["args"])
    assert "postgresql://" in args and "s3://" in args and "--app-name=basic-auth" in args
    env = {e["name"]: e for e in kinds["Deployment"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    for name in ("PGPASSWORD", "MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD"):
        assert "secretKeyRef" in env[name]["valueFrom"], name


# What names a file or folder in a uniloom command line: these options' values, and the
# `--set` keys that hold paths.
PATH_OPTIONS = ("--workspace", "--input", "--output", "--out", "--corpus", "--weights", "--model", "--config")
PATH_KEYS = re.compile(r"^(workspace|\w+\.(corpus|shards|storage|export|tokenizer_weights))=")


def cluster_commands() -> list[list[str]]:
    """The uniloom commands the manifests run on a cluster, as argument lists: the RayJob's
    entrypoint, and what follows `--` in the `uniloom submit` commands their comments give."""
    job = _docs(INFRA / "kuberay" / "rayjob.yaml")[0]
    commands = [shlex.split(job["spec"]["entrypoint"])[1:]]
    for name in ("kuberay/raycluster.yaml", "cluster-launcher.yaml"):
        for command in re.findall(r"`(uniloom submit [^`]+)`", (INFRA / name).read_text()):
            args = shlex.split(command)
            commands.append(args[args.index("--") + 1 :])
    return commands


def local_paths(args: list[str]) -> list[str]:
    """The paths in `args` that are no URL: folders of the pod or node the command runs on."""
    values = [args[i + 1] for i, a in enumerate(args[:-1]) if a in PATH_OPTIONS]
    values += [a.split("=", 1)[1] for a in args if PATH_KEYS.match(a)]
    return [v for v in values if "://" not in v and not v.startswith("models:/")]


def test_cluster_commands_keep_every_path_in_a_bucket(monkeypatch):
    """Nodes share no disk: every path a cluster command names is a URL, its workspace a
    bucket; and it starts as written, the tracking server coming from the environment."""
    from uniloom.pipelines.config import load_config
    from uniloom.pipelines.tracking import tracking_uri

    commands = cluster_commands()
    assert len(commands) == 3
    monkeypatch.setenv("MLFLOW_TRACKING_URI", _mlflow_service_url())
    for args in commands:
        assert args[0] == "run" and "--workspace" in args, args
        assert local_paths(args) == [], args
        workspace = args[args.index("--workspace") + 1]
        assert workspace.startswith("s3://"), args
        cfg = load_config(args[args.index("--preset") + 1], overrides=[f"workspace={workspace}"])
        assert tracking_uri(cfg) == _mlflow_service_url()


def test_the_path_check_catches_a_pod_local_folder():
    assert local_paths(["run", "--workspace", "/home/ray/workspace"]) == ["/home/ray/workspace"]
    assert local_paths(["train", "--set", "train.storage=/tmp/ray"]) == ["/tmp/ray"]
    assert local_paths(["run", "--set", "workspace=ws", "--workspace", "gs://b/w"]) == ["ws"]


def _mlflow_service_url() -> str:
    service = next(
        d
        for d in _docs(INFRA / "mlflow" / "mlflow.yaml")
        if d["kind"] == "Service" and d["metadata"]["name"] == "mlflow"
    )
    meta = service["metadata"]
    return (
        f"http://{meta['name']}.{meta['namespace']}.svc.cluster.local:{service['spec']['ports'][0]['port']}"
    )


def test_every_ray_process_tracks_to_the_mlflow_server_and_reaches_the_bucket():
    """Every Ray container of the KubeRay manifests gets the MLflow server of infra/mlflow
    and the storage Secret; the cluster launcher's nodes read the server from the file it
    copies to them."""
    url = _mlflow_service_url()
    job = _docs(INFRA / "kuberay" / "rayjob.yaml")[0]
    cluster = _docs(INFRA / "kuberay" / "raycluster.yaml")[0]
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]["MLFLOW_TRACKING_URI"] == url
    assert yaml.safe_load((INFRA / "runtime_env.yaml").read_text())["env_vars"]["MLFLOW_TRACKING_URI"] == url
    for spec in (job["spec"]["rayClusterSpec"], cluster["spec"]):
        for group in (spec["headGroupSpec"], *spec["workerGroupSpecs"]):
            for container in group["template"]["spec"]["containers"]:
                assert {"name": "MLFLOW_TRACKING_URI", "value": url} in container["env"]
                assert {"secretRef": {"name": "uniloom-storage"}} in container["envFrom"]
    launcher = _docs(INFRA / "cluster-launcher.yaml")[0]
    env_file = "~/uniloom-mlflow.env"
    assert env_file in launcher["file_mounts"]
    starts = [c for c in _launcher_commands(launcher) if "ray start" in c]
    assert all(c.startswith(f"set -a && . {env_file} && set +a && ") for c in starts)
    for node in launcher["available_node_types"].values():
        assert node["node_config"]["IamInstanceProfile"] == {"Name": "uniloom-node"}


LOOPBACK = {"127.0.0.1", "localhost", "::1"}
_REFERENCE = re.compile(r"\$\(\w+\)|\$\{\w+\}|\$\w+|[~./].*")  # env var or a path to a file


def _literal(value) -> bool:
    """A value written into the file, not a reference to the environment or a file."""
    text = str(value).strip()
    return (
        not isinstance(value, (dict, list, bool))
        and value is not None
        and text not in ("", "...")
        and not _REFERENCE.fullmatch(text)
    )


def committed_secrets(doc) -> list[str]:
    """Where a manifest writes a secret value itself: a Secret with inline data, a
    secret-named key or env entry with a literal value, an ini/env line inside a string,
    a password in a URI."""
    found: list[str] = []

    def walk(node, path: str) -> None:
        if isinstance(node, dict):
            if node.get("kind") == "Secret" and (node.get("data") or node.get("stringData")):
                found.append(f"{path}Secret with inline data")
            if is_secret_key(str(node.get("name", ""))) and _literal(node.get("value")):
                found.append(f"{path}{node['name']}")
            for key, value in node.items():
                if is_secret_key(str(key)) and _literal(value):
                    found.append(f"{path}{key}")
                walk(value, f"{path}{key}.")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{path}{i}.")
        elif isinstance(node, str):
            for m in re.finditer(r"^\s*([\w.-]+)\s*[=:]\s*(\S.*?)\s*$", node, re.M):
                if is_secret_key(m[1]) and _literal(m[2]):
                    found.append(f"{path}{m[1]}")
            for m in re.finditer(r"://[^/\s:@]+:([^@/\s]+)@", node):
                if _literal(m[1]):
                    found.append(f"{path}password in a URI")

    walk(doc, "")
    return found


def _launcher_commands(launcher: dict) -> list[str]:
    return [
        c for key in ("head_start_ray_commands", "worker_start_ray_commands") for c in launcher.get(key, [])
    ]


def open_dashboards(doc: dict) -> list[str]:
    """Ray dashboards that listen beyond loopback without token auth, in a cluster
    launcher config, a RayCluster or a RayJob."""
    found = []
    for command in _launcher_commands(doc):
        if "ray start" in command and "--head" in command:
            host = re.search(r"--dashboard-host[= ](\S+)", command)
            if (host[1] if host else "localhost") not in LOOPBACK and "RAY_AUTH_MODE=token" not in command:
                found.append(command)
    spec = doc.get("spec", {})
    spec = spec.get("rayClusterSpec", spec) if doc.get("kind") == "RayJob" else spec
    if doc.get("kind") in ("RayCluster", "RayJob"):
        host = (
            spec["headGroupSpec"].get("rayStartParams", {}).get("dashboard-host", "0.0.0.0")
        )  # KubeRay's default
        containers = [
            c for group in (spec["headGroupSpec"], *spec.get("workerGroupSpecs", []))
            for c in group["template"]["spec"]["containers"]
        ]  # fmt: skip
        env_auth = all({"name": "RAY_AUTH_MODE", "value": "token"} in c.get("env", []) for c in containers)
        if host not in LOOPBACK and spec.get("authOptions", {}).get("mode") != "token" and not env_auth:
            found.append(f"{doc['kind']} {doc['metadata']['name']}")
    return found


def _manifests():
    return [(path, doc) for path in sorted(INFRA.rglob("*.yaml")) for doc in _docs(path)]


def test_no_manifest_commits_a_secret():
    for path, doc in _manifests():
        assert committed_secrets(doc) == [], path


def test_no_dashboard_is_open_beyond_loopback_without_token_auth():
    for path, doc in _manifests():
        assert open_dashboards(doc) == [], path
    launcher = _docs(INFRA / "cluster-launcher.yaml")[0]
    starts = [c for c in _launcher_commands(launcher) if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token ray start" in c for c in starts)  # every node
    assert "--dashboard-host=127.0.0.1" in starts[0]
    assert "~/.ray/auth_token" in launcher["file_mounts"]


@pytest.mark.parametrize(
    "text",
    [
        "kind: Secret\nmetadata: {name: a}\nstringData: {basic_auth.ini: x}",
        "data:\n  basic_auth.ini: |\n    [mlflow]\n    admin_password = change-me-at-first-login",
        "env:\n  - {name: POSTGRES_PASSWORD, value: hunter2}",
        "env_vars: {AWS_SECRET_ACCESS_KEY: abc123}",
        "args: [--backend-store-uri=postgresql://mlflow:hunter2@db:5432/mlflow]",
    ],
)
def test_the_secret_check_catches_committed_secrets(text):
    assert committed_secrets(yaml.safe_load(text))


def test_the_dashboard_check_catches_an_open_dashboard():
    launcher = {"head_start_ray_commands": ["ray start --head --port=6379 --dashboard-host=0.0.0.0"]}
    assert open_dashboards(launcher)
    cluster = _docs(INFRA / "kuberay" / "raycluster.yaml")[0]
    unauthenticated = copy.deepcopy(cluster)
    del unauthenticated["spec"]["authOptions"]
    assert open_dashboards(unauthenticated) and not open_dashboards(cluster)
    job = copy.deepcopy(_docs(INFRA / "kuberay" / "rayjob.yaml")[0])
    del job["spec"]["rayClusterSpec"]["authOptions"]
    assert open_dashboards(job)


def test_runtime_env_is_valid_for_ray():
    from ray.runtime_env import RuntimeEnv

    env = RuntimeEnv(**yaml.safe_load((INFRA / "runtime_env.yaml").read_text()))
    assert env["env_vars"]["MLFLOW_TRACKING_URI"].startswith("http")


def test_dockerfile_installs_the_same_pins_and_every_code_folder():
    text = (INFRA / "Dockerfile").read_text()
    assert "torch==2.13.0" in text and "-c constraints.txt" in text
    for folder in ("pipelines", "models", "kernels"):
        assert f"COPY --chown=ray {folder} ./{folder}" in text
    ray_pin = re.search(r"ray==([\d.]+)", (REPO / "constraints.txt").read_text()).group(1)
    assert f"rayproject/ray:{ray_pin}" in text
