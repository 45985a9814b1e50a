"""infra/ manifests parse, and every preset, command and file they name exists."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

from uniloom.pipelines.config import preset_names

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
    assert {"Deployment", "StatefulSet", "Service", "Secret"} <= set(kinds)
    args = " ".join(kinds["Deployment"]["spec"]["template"]["spec"]["containers"][0]["args"])
    assert "postgresql://" in args and "s3://" in args and "--app-name=basic-auth" in args


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
