"""`uniloom run --set tokenizer.kind=unitok` end to end on small budgets: the kind's
tokenizer trained under Ray Train, its shards, the four-stage recipe on two Ray Train
workers, evaluation and registration (`uniloom-unitok` and `uniloom-univision`); then
`uniloom generate` and a two-round `uniloom edit` with the registered unified model.
TUNA's workflow runs the same stages in tests/integration/test_bench_tokenizers.py
(`bench tokenizers --unified`, then generate and edit with its export), and its
registered pyfunc in test_tokenizer_kinds.py."""

import json

import numpy as np
import pytest
from smallkinds import SMALL
from trainshards import draws_and_edits, uniloom
from workflowrun import BUDGETS, STAGES

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("kind", ["unitok"])
def test_the_workflow_of_each_kind_registers_a_model_that_generates_and_edits(kind, tmp_path, report):
    from mlflow.tracking import MlflowClient

    ws = tmp_path / "ws"
    sets = [
        *BUDGETS,
        "corpus.size=32",
        f"tokenizer.kind={kind}",
        *(f"{kind}.{k}={v}" for k, v in SMALL[kind].items()),
    ]
    args = [a for s in sets for a in ("--set", s)]
    result = uniloom("run", "--workspace", str(ws), *args, "--json", cwd=tmp_path, timeout=1500)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["ran"] == STAGES
    client = MlflowClient(tracking_uri=f"sqlite:///{ws / 'mlflow.db'}")
    assert {m.name for m in client.search_registered_models()} == {f"uniloom-{kind}", "uniloom-univision"}
    (version,) = client.search_model_versions("name='uniloom-univision'")
    metrics = summary["metrics"]
    assert 0 <= metrics["eval.geneval_overall"] <= 1 and np.isfinite(metrics["eval.tokenizer_psnr"])
    report(f"uniloom run, tokenizer.kind={kind}, small budgets: {summary['seconds']} s")

    draws_and_edits(f"models:/uniloom-univision/{version.version}", ws, tmp_path)
