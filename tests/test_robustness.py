"""Issue 32, tracebacks, hangs and misleading lines (cases 11-16): sub-seeds without overflow; MLflow's own
database tracebacks kept off the terminal; every request to a tracking server bounded; bounded work for huge
sweeps, big suites, huge epochs and a FIFO where a checkpoint should be; no t-test at zero variance; lines that
blame the right thing (CLBENCH_CACHE, MLflow's file-store remedy, --set/--grid flags, ui's own flag) and no stale
creation files. Cheap: no training (the suite-file cases are also in tests/bad_suites).
"""

from __future__ import annotations

import http.server
import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from clbench.errors import ClbenchError
from clbench.run import checkpoint
from clbench.store import tracking
from clbench.suite import load_suite
from clbench.testing import tiny_stream, tiny_suite_yaml


def suite_file(folder: Path, name: str = "robust") -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(tiny_suite_yaml(name, one_method=True))
    return path


# -- 11. sub-seeds ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [5_000_000, 2**32 - 1])
def test_the_validation_split_takes_every_documented_seed(seed):
    """`clbench sweep --seed 5000000`: ValueError: Seed must be between 0 and 2**32 - 1 (seed*1000+t)."""
    from clbench.data import validation
    from clbench.seeds import derive_seed

    val = validation.holdout(tiny_stream(num_tasks=2, num_classes=4, samples_per_class=8), 0.25, seed=seed)
    assert len(val.tasks) == 2 and all(len(t.test_y) == 4 for t in val.tasks)
    derived = {derive_seed(seed, t) for t in range(100)} | {derive_seed(seed + 1 if seed < 2**32 - 1 else 0, 0)}
    assert len(derived) == 101 and all(0 <= d < 2**32 for d in derived)  # in range, and no two tasks share one


# -- 12. MLflow's database tracebacks ----------------------------------------------------------------------------
def test_a_database_error_is_not_preceded_by_mlflows_traceback(tmp_path, capfd, monkeypatch):
    """A full sqlite store printed two ~20-line MLflow tracebacks before clbench's one-line error."""
    import sqlalchemy
    from sqlalchemy.orm import Session

    tracker = tracking.MlflowTracker("robust", f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = tracker.start_run("r", {}, {})
    capfd.readouterr()

    def full(self):
        raise sqlalchemy.exc.OperationalError("INSERT INTO tags", {}, Exception("database or disk is full"))

    monkeypatch.setattr(Session, "commit", full)
    with pytest.raises(Exception, match="database or disk is full"):  # what clbench turns into one line
        tracker.set_tags(run, {"k": "v"})
    out, err = capfd.readouterr()
    assert "Traceback" not in err + out and "SQLAlchemy database error" not in err + out, err


# -- 13. a tracking server that stops answering -------------------------------------------------------------------
class _Server(http.server.BaseHTTPRequestHandler):
    """Answers the requests that open an experiment, then never answers again (a server that hung mid-run)."""

    artifacts = "/tmp"

    def _json(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802 - http.server's name
        exp = {"experiment_id": "1", "name": "robust", "artifact_location": self.artifacts,
               "lifecycle_stage": "active", "tags": []}
        if "experiments/get" in self.path:
            return self._json({"experiment": exp})
        self.server.hung.wait(30)

    def do_POST(self):  # noqa: N802
        self.server.hung.wait(30)  # runs/create: no answer

    def log_message(self, *args):
        pass


def test_every_request_to_a_tracking_server_has_the_short_timeout(tmp_path, monkeypatch):
    """A server that stopped answering mid-run left the run silent for more than 420 s: MLflow's defaults (120 s,
    7 retries) held for every request but clbench's first."""
    monkeypatch.setattr(tracking, "SERVER_REQUEST_TIMEOUT_S", 1)
    monkeypatch.setattr(tracking, "SERVER_REQUEST_RETRIES", 0)
    for var in ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES"):
        monkeypatch.delenv(var, raising=False)
    _Server.artifacts = str(tmp_path / "artifacts")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Server)
    server.hung = threading.Event()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    outcome: list[BaseException | str] = []

    def start() -> None:
        try:
            tracker = tracking.MlflowTracker("robust", f"http://127.0.0.1:{server.server_port}")
            tracker.start_run("r", {}, {})
            outcome.append("answered")
        except BaseException as exc:  # noqa: BLE001 - the outcome is what the test looks at
            outcome.append(exc)

    worker = threading.Thread(target=start, daemon=True)
    worker.start()
    worker.join(25)  # liveness, not speed: MLflow's defaults wait 120 s per try
    server.hung.set()
    server.shutdown()
    assert not worker.is_alive(), "a request to a server that does not answer is still waiting"
    assert outcome and isinstance(outcome[0], Exception), outcome


# -- 14. bounded work ----------------------------------------------------------------------------------------------
def test_a_huge_random_sweep_is_refused_and_a_small_space_stops_when_drawn(tmp_path):
    """`sweep --random 1000000000` on a 2-point space spun for minutes, also with --dry-run."""
    from clbench.run.sweep import MAX_POINTS, SweepOptions, plan_sweep

    suite = load_suite(suite_file(tmp_path))
    with pytest.raises(ClbenchError, match=f"--random 1000000000: at most {MAX_POINTS} points"):
        plan_sweep(suite, "s.yaml", "lora", ["methods.lora.params.rank=[1,2]"], SweepOptions(random_n=10**9))
    plan = plan_sweep(suite, "s.yaml", "lora", ["methods.lora.params.rank=[1,2]"], SweepOptions(random_n=MAX_POINTS))
    assert sorted(t.point["methods.lora.params.rank"] for t in plan.trials) == [1, 2]
    with pytest.raises(ClbenchError, match="the grid has 10201 points"):
        plan_sweep(suite, "s.yaml", "lora", [f"methods.lora.params.rank=[{','.join(map(str, range(1, 102)))}]",
                                             f"train.lr=[{','.join(f'{i}.0e-4' for i in range(1, 102))}]"])


def test_a_big_suite_checks_each_distinct_adapter_shape_once(tmp_path, monkeypatch):
    """A 10,000-method --dry-run took 64 s: the rank check deep-copied and injected the backbone per entry."""
    from clbench.methods.registry import discover
    from clbench.model import lora
    from clbench.run import preflight
    from clbench.run.plan import plan_runs

    path = suite_file(tmp_path)
    first = "  - {name: lora, params: {rank: 2}}\n"
    path.write_text(path.read_text().replace(first, first + "".join(
        f"  - {{name: lora, label: l{i}, params: {{rank: {1 + i % 3}}}}}\n" for i in range(300))))
    suite = load_suite(path)
    calls = []
    inject = lora.inject
    monkeypatch.setattr(lora, "inject", lambda *a, **k: calls.append(1) or inject(*a, **k))
    preflight.method_problems(suite, plan_runs(suite, str(path), discover([]), None), str(path))
    assert len(calls) == 1  # one (targets, blocks) pair among 301 entries


def test_a_fifo_where_a_checkpoint_should_be_is_one_line(tmp_path):
    store = checkpoint.RunStore(tmp_path, "k")
    os.mkfifo(store.path)
    with pytest.raises(ClbenchError, match=r"checkpoint .*checkpoint\.pt: is a FIFO.*--restart"):
        store.load()  # torch.load would block for ever
    os.mkfifo(store.done_path)
    with pytest.raises(ClbenchError, match="is a FIFO"):
        store.done()


# -- 15. zero variance -------------------------------------------------------------------------------------------
def test_zero_variance_is_no_t_test_and_never_highlighted():
    from clbench.analysis import report
    from clbench.analysis.leaderboard import METRICS, Row, fmt_paired
    from clbench.analysis.stats import paired

    spec = next(m for m in METRICS if m.key == "final/acc")
    shift = paired({0: 50.1, 1: 60.1, 2: 70.1}, {0: 50.0, 1: 60.0, 2: 70.0})  # scipy: p ~ 1e-15
    row = Row(method="a", method_name="lora", params_id="x", n=3, seeds=[0, 1, 2], metrics={}, provenance={},
              runs=[], vs_baseline={"final/acc": shift.as_dict()})
    text = fmt_paired(row, "b", spec)
    assert "no t-test (zero variance)" in text and "p=" not in text, text
    assert not report._significant(row, "final/acc")
    tiny = paired({0: 50.0004, 1: 60.0005, 2: 70.0003}, {0: 50.0, 1: 60.0, 2: 70.0})
    row.vs_baseline = {"final/acc": tiny.as_dict()}
    text = fmt_paired(row, "b", spec)
    assert text.startswith("+0.0004 ±") and "+0.000 " not in text, text


# -- 16. lines that blame the right thing --------------------------------------------------------------------------
def test_an_unwritable_cache_is_blamed_on_clbench_cache(tmp_path, monkeypatch):
    blocker = tmp_path / "cache-is-a-file"
    blocker.write_text("x")
    monkeypatch.setenv("CLBENCH_CACHE", str(blocker))
    with pytest.raises(ClbenchError) as err:
        tracking.MlflowTracker("robust", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert str(err.value).startswith("CLBENCH_CACHE: cannot write") and "MLFLOW_TRACKING_URI" not in str(err.value)


def test_a_file_store_error_keeps_mlflows_remedy(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(ClbenchError) as err:
        tracking.MlflowTracker("robust", f"file://{tmp_path / 'mlruns'}")
    msg = str(err.value)
    assert "MLFLOW_ALLOW_FILE_STORE=true" in msg and "sqlite:///mlflow.db" in msg and "migrate-filestore" in msg, msg


def test_values_from_set_and_grid_are_blamed_on_their_flags(tmp_path):
    from clbench.methods.registry import discover
    from clbench.run.plan import plan_runs
    from clbench.run.preflight import method_problems
    from clbench.run.sweep import plan_sweep

    path = suite_file(tmp_path)
    suite = load_suite(path, ["methods.0.params.rank=999"])
    with pytest.raises(ClbenchError, match=r"^--set methods\.0\.params\.rank=999: .*rank: 999 exceeds"):
        method_problems(suite, plan_runs(suite, str(path), discover([]), None), str(path))
    with pytest.raises(ClbenchError, match=r"^--grid methods\.lora\.params\.rank=\[2,999\]: .*rank: 999 exceeds"):
        plan_sweep(load_suite(path), str(path), "lora", ["methods.lora.params.rank=[2,999]"])  # before --dry-run


def test_a_stale_creation_file_of_a_killed_process_is_removed(tmp_path):
    db = tmp_path / "mlflow.db"
    dead = tmp_path / ".mlflow.db.creating-999999999"  # no such process
    dead.write_bytes(b"half a database")
    mine = tmp_path / f".mlflow.db.creating-{os.getppid()}"  # a live process (our parent) may still be creating
    mine.write_bytes(b"in progress")
    tracking.MlflowTracker("robust", f"sqlite:///{db}")
    assert not dead.exists() and mine.exists()


def test_derived_seeds_are_independent_of_the_order_they_are_asked_in():
    from clbench.seeds import derive_seed

    assert derive_seed(7, 3) == derive_seed(7, 3) != derive_seed(7, 4) != derive_seed(3, 7)
    assert isinstance(derive_seed(np.int64(7), 3), int)
