"""O-LoRA's suites (suites/lm-olora-order{1,2,3}.yaml, suites/repro/olora-t5-*.yaml) state the protocol of the
official scripts as keys (github.com/cmnfriend/O-LoRA@07117e1 scripts/order_{1,2,3}.sh, scripts/long.sh), pass
--dry-run, and stop before any run exists when the CL_Benchmark data is not there."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from clbench.cli import app
from clbench.data.text_olora import benchmark
from clbench.methods.registry import discover
from clbench.run.plan import plan_runs
from clbench.suite import load_suite

ROOT = Path(__file__).resolve().parents[1]
ORDERS = [ROOT / "suites" / f"lm-olora-order{n}.yaml" for n in (1, 2, 3)]
LONG = ROOT / "suites" / "lm-olora-long.yaml"
REPRO = [ROOT / "suites" / "repro" / "olora-t5-order1.yaml", ROOT / "suites" / "repro" / "olora-t5-long.yaml"]
# scripts/long.sh, task by task: --lamda_1 and --lamda_2
LONG_LAMBDA1 = [0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 5, 5, 5, 5, 5, 5]
LONG_LAMBDA2 = [0, 0, 0, 0, 0.1, 0.1, 0.3, 0, 0.1, 0, 0, 0.1, 0, 0.1, 0.3]


@pytest.mark.parametrize("path", [*ORDERS, LONG, *REPRO], ids=[p.stem for p in [*ORDERS, LONG, *REPRO]])
def test_the_suites_state_the_official_scripts_protocol(path):
    suite = load_suite(path)
    assert suite.backbone.name == "hf:t5-large" and suite.backbone.pretrained
    t = suite.train
    # --learning_rate 1e-03 --num_train_epochs 1 --lr_scheduler_type constant --warmup_steps 0; AdamW, weight decay
    # 0 (the trainer's); 8 rows per device on 8 GPUs; no --bf16 / --fp16
    assert (t.lr, t.epochs, t.schedule, t.optimizer, t.weight_decay) == (1.0e-3, 1, "constant", "adamw", 0.0)
    assert (t.batch_size, t.precision) == (64, "fp32")
    order = benchmark().streams[suite.stream.name]
    assert suite.stream.num_tasks == len(order)
    planned = {p.label: p for p in plan_runs(suite, path, discover([]), None)}
    olora = planned["olora"].params
    assert (olora.rank, olora.alpha, olora.dropout, olora.targets) == (8, 32.0, 0.1, ["q", "v"])
    if suite.stream.name == "olora_long":
        assert (olora.lambda1, olora.lambda2) == (LONG_LAMBDA1, LONG_LAMBDA2) and len(order) == 15
    else:
        assert (olora.lambda1, olora.lambda2) == (0.5, 0.0)
    for label, p in planned.items():  # the baselines share O-LoRA's LoRA shape
        assert (p.params.rank, p.params.targets) == (8, ["q", "v"]), label


def test_the_three_orders_are_the_official_ones():
    names = [load_suite(p).stream.name for p in ORDERS]
    assert names == ["olora_order1", "olora_order2", "olora_order3"]
    assert len({load_suite(p).protocol_hash() for p in ORDERS}) == 3


@pytest.mark.parametrize("path", REPRO, ids=[p.stem for p in REPRO])
def test_repro_references_cite_the_released_logs(path):
    suite = load_suite(path)
    olora = next(r for r in suite.reference if r.method == "olora")
    assert "@07117e1" in olora.source and "logs_and_outputs/" in olora.source
    assert list(olora.per_seed) == suite.seeds == [42]  # the trainer's default seed
    assert {r.method for r in suite.reference} == {m.display for m in suite.methods}  # every entry compared
    assert all(r.tolerance == 1.0 and "@07117e1" in r.source for r in suite.reference)


@pytest.mark.parametrize("path", [ORDERS[0], REPRO[1]], ids=["order1", "repro-long"])
def test_dry_run_passes_and_a_real_run_stops_at_once_without_the_data(path, tmp_path, monkeypatch):
    monkeypatch.setenv("CLBENCH_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = CliRunner().invoke(app, ["run", str(path), "--dry-run"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, ["run", str(path), "--tracking-uri", f"sqlite:///{tmp_path}/m.db",
                                      "--checkpoint-dir", str(tmp_path / "ck")])
    assert result.exit_code == 1, result.output
    assert "O-LoRA's CL_Benchmark is not under" in result.output and "github.com/cmnfriend/O-LoRA" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "m.db").exists()
