"""The install layout: three code folders under the `uniloom` namespace, nothing bare."""

import subprocess
import sys
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]


def test_uniloom_packages_import_outside_the_repo_and_bare_names_do_not(tmp_path):
    code = (
        "import importlib.util, uniloom.models, uniloom.kernels, uniloom.pipelines\n"
        "for bare in ('models', 'kernels', 'pipelines'):\n"
        "    spec = importlib.util.find_spec(bare)\n"
        "    assert spec is None or 'uniloom' not in str(spec.origin), (bare, spec)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_every_source_package_is_listed_for_wheels():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set()
    for folder in ("pipelines", "models", "kernels"):
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO).parts
            found.add(".".join(("uniloom", *rel)))
    assert found == listed
