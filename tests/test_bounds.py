"""The reference methods (finetune, frozen, joint, er) and the rehearsal hooks they use: the property that makes
each method that method, on the micro ViT and a synthetic stream (seconds each)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from clbench_plugins.er import ExperienceReplay
from clbench_plugins.finetune import Finetune
from clbench_plugins.frozen import Frozen
from clbench_plugins.joint import Joint

from clbench import contract, keys
from clbench.analysis import leaderboard as lb
from clbench.analysis.report import render_html
from clbench.errors import ClbenchError
from clbench.methods import rehearsal
from clbench.methods.context import TaskContext
from clbench.methods.hookspecs import hookimpl
from clbench.methods.method import Method
from clbench.methods.registry import run_manager
from clbench.methods.rehearsal import Samples
from clbench.model.dense import backbone_maps
from clbench.run.loop import LoopOptions, run_stream
from clbench.testing import run_method, tiny_model, tiny_stream, tiny_train


class Rows:
    """A read-only probe: per task, the labels and scopes of the rows the rehearsal hooks added."""

    def __init__(self):
        self.by_task: dict[int, list[tuple[torch.Tensor, torch.Tensor, int]]] = {}

    @hookimpl
    def loss_terms(self, batch, replayed, ctx):
        if replayed is not None:
            self.by_task.setdefault(ctx.task, []).append((replayed.y.clone(), replayed.scope.clone(), len(batch[1])))


def probed_run(method, stream, **train):
    probe = Rows()
    results = []
    state = run_stream(tiny_model(), stream, run_manager(method, probes=[probe]), tiny_train(**train), 0,
                       LoopOptions(on_task=lambda res, st, m: results.append(res)))
    return state, results, probe


# -- frozen ----------------------------------------------------------------------------------------------------


def test_frozen_has_exactly_zero_task_incremental_forgetting_and_an_untouched_backbone():
    model = tiny_model()
    before = copy.deepcopy(model.backbone.state_dict())
    run = run_method(Frozen(), stream=tiny_stream(num_tasks=3, num_classes=6, samples_per_class=8), model=model,
                     max_steps_per_epoch=3)
    R_til = run.state.R_til
    for j in range(3):
        assert np.all(R_til[j:, j] == R_til[j, j]), R_til  # a task's TIL accuracy never moves after its task
    assert all(torch.equal(v, model.backbone.state_dict()[k]) for k, v in before.items())
    assert [r.updates for r in run.results] == [None, None, None]
    assert run.results[0].trainable_params == sum(p.numel() for p in model.heads[0].parameters())


# -- finetune --------------------------------------------------------------------------------------------------


def test_finetune_trains_every_backbone_parameter_and_reports_the_dense_change():
    model = tiny_model()
    start = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    maps0 = {n: w.detach()[rows].clone() for n, (w, rows) in backbone_maps(model.backbone).items()}
    run = run_method(Finetune({"update_rank": None}), stream=tiny_stream(num_tasks=2, samples_per_class=8),
                     model=model, max_steps_per_epoch=2)
    unchanged = [n for n, p in model.backbone.named_parameters() if torch.equal(p, start[n])]
    assert unchanged == [], unchanged  # every backbone parameter trained (no adapter, nothing frozen)
    assert run.results[0].trainable_params >= sum(p.numel() for p in model.backbone.parameters())
    # After the run the maps hold task 0's plus task 1's change: the two reported (exact) updates sum to it.
    ups = [r.updates for r in run.results]
    assert set(ups[0]) == set(maps0) and {n.rsplit(".", 1)[1] for n in maps0} == {"q", "k", "v", "proj", "fc1",
                                                                                     "fc2"}
    for n, (w, rows) in backbone_maps(model.backbone).items():
        change = w.detach()[rows] - maps0[n]
        torch.testing.assert_close(ups[0][n].dense() + ups[1][n].dense(), change, atol=1e-6, rtol=1e-5)


def test_finetune_top_k_update_is_the_best_rank_k_approximation():
    run = run_method(Finetune({"update_rank": 3}), stream=tiny_stream(num_tasks=2, samples_per_class=8),
                     max_steps_per_epoch=2)
    exact = run_method(Finetune({"update_rank": None}), stream=tiny_stream(num_tasks=2, samples_per_class=8),
                       max_steps_per_epoch=2)
    for name, u in run.results[1].updates.items():
        assert u.rank == 3
        full = exact.results[1].updates[name].dense()  # same seed: the same training, the exact change
        U, S, Vh = torch.linalg.svd(full)
        torch.testing.assert_close(u.dense(), (U[:, :3] * S[:3]) @ Vh[:3], atol=1e-5, rtol=1e-4)


# -- the rehearsal loss ----------------------------------------------------------------------------------------


def test_scoped_loss_is_the_cross_entropy_over_own_head_or_all_seen_heads():
    torch.manual_seed(0)
    offsets = torch.tensor([0, 2, 5, 7])
    logits = torch.randn(4, 5)  # two tasks seen: 2 + 3 classes
    y = torch.tensor([1, 3, 0, 4])
    code = {s: i for i, s in enumerate(rehearsal.SCOPES)}
    seen = torch.full((4,), code["seen"])
    assert torch.allclose(rehearsal.scoped_loss(logits, y, seen, offsets), F.cross_entropy(logits, y))
    task = torch.full((4,), code["task"])
    want = torch.stack([F.cross_entropy(logits[i:i + 1, lo:hi], y[i:i + 1] - lo)
                        for i, (lo, hi) in enumerate([(0, 2), (2, 5), (0, 2), (2, 5)])]).mean()
    assert torch.allclose(rehearsal.scoped_loss(logits, y, task, offsets), want)
    none = torch.tensor([code["none"], code["seen"], code["none"], code["none"]])  # only row 1 is scored
    assert torch.allclose(rehearsal.scoped_loss(logits, y, none, offsets), F.cross_entropy(logits[1:2], y[1:2]))


def test_samples_are_validated_with_one_clear_line():
    with pytest.raises(ClbenchError, match="uint8"):
        Samples(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ClbenchError, match="scope"):
        Samples(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(2, dtype=torch.long), "all")


class Peeking(Method):
    """Replays a sample of the last task's classes during task 0: refused by the loop."""

    name = "peeking"

    @hookimpl
    def configure_model(self, model):
        model.backbone.requires_grad_(False)  # trains the head only: the refusal under test is the replay's

    @hookimpl
    def replay_batch(self, ctx):
        return Samples(torch.zeros(1, 1, 16, 16, dtype=torch.uint8), torch.tensor([ctx.num_tasks * 2 - 1]))


def test_rehearsal_of_unseen_classes_is_refused():
    with pytest.raises(ClbenchError, match="outside the seen classes 0..1"):
        run_method(Peeking(), stream=tiny_stream(num_tasks=2, samples_per_class=8), max_steps_per_epoch=1)


class LogitMatch(Method):
    """DER's core written on the extension point alone: replayed samples scored by the method (scope "none")
    against logits it stored when they entered its buffer, through ``loss_terms``' ``replayed``."""

    name = "logitmatch"
    trains_backbone = True  # it unfreezes the backbone (below), as a fine-tuning method declares

    def __init__(self):
        super().__init__()
        self.x, self.y, self.z = None, None, None
        self.seen_rows: list[tuple[int, torch.Tensor]] = []

    @hookimpl
    def configure_model(self, model):
        model.backbone.requires_grad_(True)  # so the replayed samples' logits drift from the stored ones

    @hookimpl
    def replay_batch(self, ctx):
        return None if self.x is None else Samples(self.x, self.y, "none")

    @hookimpl
    def loss_terms(self, replayed, ctx):
        if replayed is None:
            return None
        self.seen_rows.append((replayed.logits.shape[1], replayed.scope.clone()))
        return {"der": F.mse_loss(replayed.logits[:, : self.z.shape[1]].float(), self.z)}

    @hookimpl
    def after_task(self, model, ctx):
        if ctx.task == 0:  # keep four samples of task 0 with the logits the model gives them now
            data = ctx.task_samples().take(torch.arange(4))
            with torch.no_grad():
                self.z = model(model.preprocess(data.x)).float()
            self.x, self.y = data.x, data.y


def test_the_extension_point_carries_der_style_logit_replay():
    method = LogitMatch()
    run = run_method(method, stream=tiny_stream(num_tasks=2, samples_per_class=8), batch_size=8)  # 2 steps a task
    assert run.results[0].loss_terms == {} and run.results[1].loss_terms["der"] > 0
    # task 1: four replayed rows per step, scored by the method only, with logits over all 4 seen classes
    none = rehearsal.SCOPES.index("none")
    assert [(n, s.tolist()) for n, s in method.seen_rows] == [(4, [none] * 4)] * 2


# -- joint -----------------------------------------------------------------------------------------------------


def test_joint_trains_on_the_union_of_seen_tasks_over_every_seen_head():
    stream = tiny_stream(num_tasks=3, num_classes=6, samples_per_class=8)
    model = tiny_model()
    probe = Rows()
    results = []
    heads: list[torch.Tensor] = []

    def on_task(res, st, m):
        results.append(res)
        heads.append(m.heads[0].weight.detach().clone())

    run_stream(model, stream, run_manager(Joint({"trainable": "lora", "rank": 2}), probes=[probe]),
               tiny_train(batch_size=8), 0, LoopOptions(on_task=on_task))
    sizes = [len(t.train_y) for t in stream.tasks]
    for t in range(3):
        rows = probe.by_task[t]
        labels = torch.cat([y for y, _, _ in rows])
        # one epoch over the union: every training sample of tasks 0..t exactly once, all scored on every head
        assert len(labels) == sum(sizes[: t + 1])
        assert torch.equal(labels.sort().values, torch.cat([s.train_y for s in stream.tasks[: t + 1]]).sort().values)
        assert all(bool((s == rehearsal.SCOPES.index("seen")).all()) and n_own == 0 for _, s, n_own in rows)
        assert results[t].buffer_images == sum(sizes[: t + 1])  # its "buffer" is all data seen
    assert not torch.equal(heads[0], heads[1])  # task 0's head keeps training on task 1 (every seen class competes)


def test_joint_beats_sequential_lora_with_the_same_adapters_on_class_incremental_accuracy():
    from clbench_plugins.lora import NaiveLoRA

    stream = tiny_stream(num_tasks=3, num_classes=6, samples_per_class=16)
    joint = run_method(Joint(), stream=stream, epochs=2)  # LoRA rank 10 on q, v: the lora baseline's adapters
    seq = run_method(NaiveLoRA(), stream=stream, epochs=2)
    assert joint.R[2, :3].mean() > seq.R[2, :3].mean() + 10, (joint.R, seq.R)


# -- er --------------------------------------------------------------------------------------------------------


def test_reservoir_keeps_a_uniform_sample_of_the_stream():
    """Algorithm R: after n samples each one is in the buffer with probability capacity / n, whatever its
    position in the stream (checked over 400 seeded draws of a stream of 3 tasks x 20 samples, capacity 12)."""
    counts = torch.zeros(60)
    for seed in range(400):
        er = ExperienceReplay({"buffer_size": 12})
        for t in range(3):
            ids = torch.arange(20 * t, 20 * (t + 1))
            x = ids.to(torch.uint8).view(-1, 1, 1, 1)
            er._reservoir(Samples(x, ids), t, 12, torch.Generator().manual_seed(seed * 10 + t))
            assert len(er.buf_y) == min(12, 20 * (t + 1)) and er.seen == 20 * (t + 1)
            assert torch.equal(er.buf_x.view(-1).long(), er.buf_y)  # images and labels move together
            assert torch.equal(er.index[:, 0] * 20 + er.index[:, 1], er.buf_y)  # and the (task, row) index
        counts[er.buf_y] += 1
    assert int(counts.sum()) == 400 * 12
    p = counts / 400
    for part in p.view(3, 20):  # early and late samples alike: 0.2 each (binomial sd 0.02 per sample)
        assert abs(float(part.mean()) - 0.2) < 0.02, p.view(3, 20)


def test_er_replays_only_earlier_tasks_at_its_ratio_and_reports_its_buffer():
    stream = tiny_stream(num_tasks=3, num_classes=6, samples_per_class=8)
    er = ExperienceReplay({"rank": 2, "replay_ratio": 0.5, "per_class": 3})
    _, results, probe = probed_run(er, stream, batch_size=8, max_steps_per_epoch=3)
    assert 0 not in probe.by_task  # nothing to replay on the first task
    seen = rehearsal.SCOPES.index("seen")
    for t in (1, 2):
        for y, scope, n_own in probe.by_task[t]:
            # the task's own 8 samples first (over every seen head: training_set), then 4 replayed ones
            assert n_own == 0 and len(y) == 12 and bool((scope == seen).all())
            assert bool(((y[:8] >= 2 * t) & (y[:8] < 2 * t + 2)).all())
            assert int(y[8:].max()) < 2 * t  # replayed: earlier tasks' classes only
    assert [r.buffer_images for r in results] == [16, 18, 18]  # capacity 3 x 6 classes, filled after task 0
    assert sorted(set(er.buf_y.tolist())) == list(range(6))


def test_er_checkpoints_its_buffer_as_stream_indices_and_decodes_the_same_images():
    """The buffer is checkpointed as (task, row) pairs, never images: the state is the same size for 8x8 and
    64x64 images, and the images decoded from the stream on resume are the ones the buffer held."""
    import io

    sizes = []
    for size in (8, 64):
        g = torch.Generator().manual_seed(size)
        tasks = [Samples(torch.randint(0, 256, (20, 1, size, size), dtype=torch.uint8, generator=g),
                         torch.arange(20) // 10 + 2 * t) for t in range(3)]
        er = ExperienceReplay({"buffer_size": 12})
        for t in range(3):
            er._reservoir(tasks[t], t, 12, torch.Generator().manual_seed(t))
        saved = er.method_state(ctx=None)
        assert set(saved) == {"index", "seen"} and saved["index"].shape == (12, 2)
        buf = io.BytesIO()
        torch.save(saved, buf)
        sizes.append(buf.tell())
        twin = ExperienceReplay({"buffer_size": 12})
        ctx = TaskContext(task=2, num_tasks=3, classes=(4, 5), seen_classes=tuple(range(6)),
                          device=torch.device("cpu"), seed=0, loader=lambda **kw: iter(()), samples_of=tasks.__getitem__)
        twin.load_method_state(model=None, state=saved, ctx=ctx)
        assert torch.equal(twin.buf_x, er.buf_x) and torch.equal(twin.buf_y, er.buf_y) and twin.seen == 60
    assert sizes[0] == sizes[1] < 2_000, sizes
    with pytest.raises(ClbenchError, match="older format"):
        twin.load_method_state(model=None, state={"x": er.buf_x, "y": er.buf_y, "seen": 60}, ctx=ctx)


# ER's bit-exact resume with a non-empty buffer (and its failure when the buffer is not checkpointed) is
# tests/test_contract.py's test_rehearsal_buffer_lost_on_resume_fails.


# -- leaderboard -----------------------------------------------------------------------------------------------


def _row(label: str, name: str, acc: float | None, forgetting: float) -> lb.Row:
    metrics = {k: lb.Stat(None, None, 0) for k in lb.METRIC_KEYS}
    metrics[keys.FINAL_ACC] = lb.Stat(acc, None, 0 if acc is None else 1)
    metrics[keys.FINAL_FORGETTING] = lb.Stat(forgetting, None, 1)
    prov = {k: [] for k in lb.PROVENANCE_TAGS}
    return lb.Row(method=label, method_name=name, params_id="p", n=1, seeds=[0], metrics=metrics, provenance=prov)


def test_leaderboard_marks_the_bounds_and_each_rows_share_of_the_gap():
    rows = [_row("joint", "joint", 90.0, 2.0), _row("joint-full", "joint", 80.0, 1.0),
            _row("finetune", "finetune", 20.0, 80.0), _row("frozen", "frozen", 30.0, 30.0),
            _row("lora", "lora", 44.0, 50.0), _row("broken", "lora", None, 5.0)]
    lb.mark_references(rows, keys.FINAL_ACC)
    roles = {r.method: r.reference for r in rows}
    assert roles == {"joint": "upper bound", "joint-full": "upper bound", "finetune": "lower reference",
                     "frozen": "lower reference", "lora": None, "broken": None}
    # upper = the best joint row (90), lower = the better lower reference (frozen, 30)
    share = {r.method: r.gap_share for r in rows}
    assert share["lora"] == pytest.approx((44 - 30) / 60) and share["joint"] == 1.0 and share["frozen"] == 0.0
    assert share["finetune"] == pytest.approx(-10 / 60) and share["broken"] is None
    lb.mark_references(rows, keys.FINAL_FORGETTING)  # lower is better: upper = joint-full (1), lower = frozen (30)
    assert {r.method: r.gap_share for r in rows}["lora"] == pytest.approx((50 - 30) / (1 - 30))

    group = lb.Group("bench", ["s"], "h", lb.sort_rows(rows, keys.FINAL_ACC), [], keys.FINAL_ACC)
    lb.mark_references(group.rows, keys.FINAL_ACC)
    header, body = lb.table_cells(group)
    assert header[-2:] == ["reference", "gap_share"]
    assert [c[-2:] for c in body if c[1] in ("joint", "lora", "broken")] == [
        ["upper bound", "1.00"], ["", "0.23"], ["", "-"]]
    assert any("gap_share" in line and "final/acc" in line for line in lb.note_lines(group))
    page = render_html([group])
    # header cells may carry <wbr> break hints (the table fits 1600 px); the column's name is what counts
    assert "<tr class=upper>" in page and page.count("<tr class=lower>") == 2
    assert ">gap_share</th>" in page.replace("<wbr>", "")

    plain = lb.Group("bench", ["s"], "h", [_row("lora", "lora", 44.0, 50.0)], [], keys.FINAL_ACC)
    lb.mark_references(plain.rows, keys.FINAL_ACC)
    assert "gap_share" not in lb.table_cells(plain)[0]  # no bounds ran: the table is unchanged


@pytest.mark.parametrize("cls", [ExperienceReplay, Joint])
def test_full_fine_tuning_variants_meet_the_contract(cls):
    # trainable: full declares trains_backbone on the instance and reports dense changes of the backbone's maps
    assert cls({"trainable": "full"}).trains_backbone and not cls().trains_backbone
    run = contract.check_method(cls, {"trainable": "full"})
    assert set(run.results[1].updates) == set(run.maps)


def test_references_without_continual_training_are_marked_but_no_end_of_the_gap():
    rows = [_row("ranpac", "ranpac", 85.0, 6.0), _row("joint", "joint", 90.0, 2.0),
            _row("simplecil", "simplecil", 52.0, 16.0), _row("frozen", "frozen", 30.0, 30.0),
            _row("lora", "lora", 44.0, 50.0)]
    group = lb.Group("bench", ["s"], "h", lb.sort_rows(rows, keys.FINAL_ACC), [], keys.FINAL_ACC)
    lb.mark_references(group.rows, keys.FINAL_ACC)
    roles = {r.method: r.reference for r in group.rows}
    assert roles["ranpac"] == roles["simplecil"] == lb.NO_CONTINUAL_TRAINING and roles["lora"] is None
    share = {r.method: r.gap_share for r in group.rows}  # ends: joint (90) and frozen (30), as without them
    assert share["lora"] == pytest.approx(14 / 60) and share["ranpac"] == pytest.approx(55 / 60)
    page = render_html([group])
    assert page.count("<tr class=nocl>") == 2 and "no continual training" in page
    # the reference column appears where only these references ran
    alone = lb.Group("bench", ["s"], "h", [_row("simplecil", "simplecil", 52.0, 16.0), _row("lora", "lora", 44.0,
                                                                                               50.0)], [], keys.FINAL_ACC)
    lb.mark_references(alone.rows, keys.FINAL_ACC)
    header, body = lb.table_cells(alone)
    assert "reference" in header and body[0][header.index("reference")] == lb.NO_CONTINUAL_TRAINING
