"""One run over several processes (clbench.run.distributed): gloo over 2 CPU processes equals one process.

Tolerance: the gradient of a global batch is summed across ranks in another order than one process sums it, so
parameters may differ in the last bits (checked: max abs difference < 1e-5); accuracy matrices may differ by at
most one test prediction per cell (100 / test-set size points), and in practice are equal.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

METHODS = ("lora", "inflora")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _setup(batch_size: int):
    from clbench.testing import tiny_stream, tiny_train

    stream = tiny_stream(num_tasks=2, num_classes=4, samples_per_class=12)
    return stream, tiny_train(epochs=2, batch_size=batch_size, lr=1e-2)


def _uneven_batch_size(n: int) -> int:
    """A batch size whose last batch holds one sample: one rank's share of it is empty."""
    return next(b for b in range(5, n) if n % b == 1)


def _train(name: str, batch_size: int):
    from clbench.methods.registry import discover, run_manager
    from clbench.run.distributed import communicator
    from clbench.run.loop import LoopOptions, run_stream
    from clbench.testing import tiny_model

    stream, cfg = _setup(batch_size)
    model = tiny_model(seed=0)
    method = discover([], strict=False).get(name).cls()
    state = run_stream(model, stream, run_manager(method), cfg, 0, LoopOptions(comm=communicator()))
    return state.R, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _rank(rank: int, world: int, port: int, batch_size: int, out: str) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    results = {name: _train(name, batch_size) for name in METHODS}
    if rank == 0:
        torch.save({n: {"R": torch.from_numpy(r), "model": m} for n, (r, m) in results.items()}, out)
    import torch.distributed as dist

    dist.destroy_process_group()


def test_two_gloo_ranks_train_like_one_process(tmp_path):
    from clbench.testing import tiny_model

    stream, _ = _setup(16)
    n_train = min(len(t.train_y) for t in stream.tasks)
    batch_size = _uneven_batch_size(n_train)
    out = tmp_path / "rank0.pt"
    mp.spawn(_rank, args=(2, _free_port(), batch_size, str(out)), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)
    assert "WORLD_SIZE" not in os.environ
    min_test = min(len(t.test_y) for t in stream.tasks)
    init = tiny_model(seed=0).state_dict()
    for name in METHODS:
        R, model = _train(name, batch_size)  # one process
        R2 = got[name]["R"].numpy()
        assert np.array_equal(np.isnan(R), np.isnan(R2))
        assert np.nanmax(np.abs(R - R2)) <= 100.0 / min_test + 1e-9, (name, R, R2)
        assert sorted(model) == sorted(got[name]["model"])
        diff = max(float((model[k].float() - got[name]["model"][k].float()).abs().max()) for k in model)
        assert diff < 1e-5, (name, diff)
        print(f"ddp_{name}_max_param_diff={diff:.3g} ddp_{name}_max_acc_diff={np.nanmax(np.abs(R - R2)):.3g}")
        # not vacuous: training moved the weights (LoRA's B starts at zero; InfLoRA merges into the base weight)
        moved = [k for k, v in model.items() if (k.endswith(".B") and float(v.abs().max()) > 0)
                 or (k.replace(".base.", ".") in init and not torch.equal(init[k.replace(".base.", ".")], v))]
        assert moved, name


SUITE = """\
name: ddp
seeds: [0]
stream: {name: synthetic, num_tasks: 2, num_classes: 4, samples_per_class: 12}
backbone: {name: vit_micro_clbench, image_size: 16, pretrained: false}
train: {epochs: 2, batch_size: 7, lr: 1.0e-2}
runtime: {device: cpu, log_every: 1000}
methods:
  - {name: lora, params: {rank: 2}}
tracking: {experiment: ddp}
"""


@pytest.mark.slow  # two `clbench run` processes under torchrun plus one in-process reference run
def test_torchrun_clbench_run_logs_once_from_rank_zero(tmp_path, mlflow_uri):
    from mlflow.tracking import MlflowClient

    from clbench.run.runner import RunOptions, run_suite
    from clbench.store.tracking import MlflowTracker
    from clbench.suite import load_suite

    path = tmp_path / "ddp.yaml"
    path.write_text(SUITE)
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", str(_free_port()), "-m", "clbench.cli", "run", str(path),
                           "--checkpoint-dir", str(tmp_path / "ck")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(tracking_uri=mlflow_uri)
    exp = client.get_experiment_by_name("ddp")
    runs = client.search_runs([exp.experiment_id])
    kids = [r for r in runs if r.data.tags.get("clbench.role") == "child"]
    assert len(runs) == 2 and len(kids) == 1  # rank 1 logged nothing
    steps = sorted(m.step for m in client.get_metric_history(kids[0].info.run_id, "eval/acc"))
    assert steps == [0, 1]
    # one checkpoint folder, written by rank 0
    assert len(list((tmp_path / "ck").glob("*/lora-*-s0/done.json"))) == 1

    [one] = run_suite(load_suite(path), str(path), RunOptions(tracker=MlflowTracker("ddp-one", f"sqlite:///{tmp_path / 'one.db'}"),
                                                              progress=lambda s: None,
                                                              checkpoint_dir=str(tmp_path / "ck-one")))
    min_test = 12 * 2 // 4  # lower bound on a task's test set in this stream; a cell moves by 100/size per flip
    for key in ("final/acc", "final/avg_acc", "final/forgetting", "final/acc_til"):
        assert kids[0].data.metrics[key] == pytest.approx(one.metrics[key], abs=100.0 / min_test), key


@pytest.mark.parametrize("rank", [0, 1])
def test_under_torchrun_an_error_is_printed_once_by_rank_zero(rank, monkeypatch, tmp_path):
    """Every rank meets the same bad input; only rank 0 prints it (then one line pointing past torchrun's own
    ChildFailedError report), the others exit 1 silently."""
    from typer.testing import CliRunner

    from clbench.cli import app

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", str(rank))
    res = CliRunner().invoke(app, ["run", str(tmp_path / "missing.yaml")])
    assert res.exit_code == 1
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == (1 if rank == 0 else 0), res.output
    assert ("ChildFailedError" in res.output) == (rank == 0)
