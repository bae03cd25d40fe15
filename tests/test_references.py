"""The references with no continual training (SimpleCIL, RanPAC) and the no-gradient path they run on.

Each method is checked against the property that makes it that method, computed here independently (numpy /
scipy, not the plugin's helpers): SimpleCIL's heads are the normalised class means of the frozen backbone's
features and an old class's prototype never changes; RanPAC's heads are the closed-form ridge solution
``(G + lambda I)^-1 Q`` over ReLU-projected features, with lambda chosen by the official rule
(``RanPAC.py: optimise_ridge_parameter``). The contract (registration, two tasks, determinism, bit-exact resume)
runs for both in tests/test_contract.py like for every registered method.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from clbench_plugins.ranpac import OFFICIAL_RIDGES, RanPAC, choose_ridge, random_projection, unpack_lower
from clbench_plugins.simplecil import SimpleCIL
from typer.testing import CliRunner

from clbench import hookimpl, keys
from clbench.cli import app
from clbench.testing import assert_resumes, mlflow_runs, run_method, tiny_model, tiny_stream, tiny_suite_yaml


def backbone_features(stream, seed: int = 0, model=None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per task: the pre-trained (here: seeded random) tiny ViT's pooled features of every training image and
    their stream-wide labels, computed outside the method (``model``: another model's backbone)."""
    model = (model or tiny_model(seed=seed)).eval()
    out = []
    with torch.no_grad():
        for task in stream.tasks:
            fs, ys = [], []
            for i in range(0, len(task.train_y), 64):
                fs.append(model.backbone(model.preprocess(task.train_x[i:i + 64])).double().numpy())
                ys.append(np.asarray(task.train_y[i:i + 64]))
            out.append((np.concatenate(fs), np.concatenate(ys)))
    return out


def official_ridge(H: np.ndarray, Y: np.ndarray, ridges, fraction: float = 0.8) -> tuple[float, list[float]]:
    """RanPAC.py ``optimise_ridge_parameter``, line by line in numpy (float64)."""
    n = int(H.shape[0] * fraction)
    Q_val, G_val = H[:n].T @ Y[:n], H[:n].T @ H[:n]
    losses = []
    for ridge in ridges:
        Wo = np.linalg.solve(G_val + ridge * np.eye(G_val.shape[0]), Q_val).T
        losses.append(float(np.mean((H[n:] @ Wo.T - Y[n:]) ** 2)))
    return ridges[int(np.argmin(np.array(losses)))], losses


def heads_matrix(model) -> np.ndarray:
    return torch.cat([h.weight.detach() for h in model.heads]).double().numpy()


# -- SimpleCIL ----------------------------------------------------------------------------------------------------

def test_simplecil_heads_are_normalised_class_means():
    stream = tiny_stream(num_tasks=2, num_classes=4)
    run = run_method(SimpleCIL(), stream)
    feats = backbone_features(stream)
    F_all = np.concatenate([f for f, _ in feats])
    y_all = np.concatenate([y for _, y in feats])
    means = np.stack([F_all[y_all == c].mean(0) for c in range(4)])
    np.testing.assert_allclose(run.method.prototypes.double().numpy(), means, rtol=1e-5, atol=1e-5)
    W = heads_matrix(run.model)
    np.testing.assert_allclose(W, means / np.linalg.norm(means, axis=1, keepdims=True), rtol=1e-5, atol=1e-6)
    assert all(float(h.bias.abs().max()) == 0 for h in run.model.heads)
    # the scores are the cosine up to each image's feature norm: the argmax is the official cosine classifier's
    x = stream.tasks[0].test_x[:8]
    with torch.no_grad():
        xb = run.model.preprocess(x)
        f = run.model.backbone(xb).double().numpy()
        logits = run.model(xb).double().numpy()
    cos = (f / np.linalg.norm(f, axis=1, keepdims=True)) @ (means / np.linalg.norm(means, axis=1, keepdims=True)).T
    np.testing.assert_array_equal(logits.argmax(1), cos.argmax(1))


class _Recording(SimpleCIL):
    """SimpleCIL keeping a copy of its prototypes after every task."""

    def __init__(self, params=None) -> None:
        super().__init__(params)
        self.history: list[torch.Tensor] = []

    @hookimpl
    def method_state(self, ctx):
        self.history.append(self.prototypes.clone())
        return super().method_state(ctx)


def test_simplecil_old_prototypes_never_change():
    run = run_method(_Recording(), tiny_stream(num_tasks=3, num_classes=6))
    for res in run.results:  # the loop trains nothing for a no-gradient method
        assert res.loss is None and res.trainable_params == 0 and res.images == 0
    h = run.method.history
    assert [len(p) for p in h] == [2, 4, 6]
    for t in range(1, 3):
        assert torch.equal(h[t][: 2 * t], h[t - 1])  # bit for bit


# -- RanPAC ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("M", [16, 64, 400])  # 96 images: G and Q kept; G summed, features kept; dual
def test_ranpac_heads_are_the_closed_form_ridge_solution(M):
    stream = tiny_stream(num_tasks=2, num_classes=4)
    run = run_method(RanPAC({"M": M}), stream)
    feats = backbone_features(stream)
    W_rand = random_projection(run.model.backbone.num_features, M, 0).double().numpy()
    H = np.maximum(np.concatenate([f for f, _ in feats]) @ W_rand, 0)
    Y = np.eye(4)[np.concatenate([y for _, y in feats])]
    lam = run.method.lambdas[-1]
    G, Q = H.T @ H, H.T @ Y
    Wo = scipy.linalg.solve(G + lam * np.eye(M), Q, assume_a="pos").T
    np.testing.assert_allclose(heads_matrix(run.model), Wo, rtol=2e-3, atol=1e-4 * np.abs(Wo).max())
    # old classes' prototype columns of Q depend only on their own task's images
    H0 = np.maximum(feats[0][0] @ W_rand, 0)
    np.testing.assert_allclose(Q[:, :2], H0.T @ np.eye(4)[feats[0][1]][:, :2], rtol=1e-10)


def test_ranpac_lambda_is_the_official_choice_on_the_current_task():
    stream = tiny_stream(num_tasks=2, num_classes=4)
    run = run_method(RanPAC({"M": 64}), stream)
    # the method's stored features are the current task's in its shuffled loader order: the official split
    for t in range(2):
        F = run.method.features[t].double().numpy()
        W_rand = random_projection(F.shape[1], 64, 0).double().numpy()
        H = np.maximum(F @ W_rand, 0)
        Y = np.eye(2 * (t + 1))[run.method.labels[t].numpy()]
        assert run.method.lambdas[t] == official_ridge(H, Y, OFFICIAL_RIDGES)[0]


@pytest.mark.parametrize("N,M", [(200, 30), (60, 300)])  # eigh of H^T H, and of the kernel H H^T
def test_choose_ridge_matches_the_official_rule(N, M):
    rng = np.random.default_rng(N + M)
    X = rng.standard_normal((N, 12))
    H = np.maximum(X @ rng.standard_normal((12, M)), 0)
    labels = (X[:, 0] + 0.5 * rng.standard_normal(N) > 0).astype(int) + 2 * (X[:, 1] > 0)
    Y = np.eye(4)[labels]
    grid = [10.0 ** k for k in range(-2, 9)]  # above the float64 noise floor of a dense solve
    want, losses = official_ridge(H, Y, grid)
    assert len(set(np.round(losses, 12))) > 3  # the rule has something to choose
    got = choose_ridge(torch.from_numpy(H), torch.from_numpy(Y), grid)
    assert got == want


def test_ranpac_checkpoint_state_is_compact():
    run = run_method(RanPAC(), tiny_stream(num_tasks=2, num_classes=4))  # the official M = 10000
    state = run.method.method_state(None)
    assert run.method.params.M == 10000 and run.method.params.ridges == OFFICIAL_RIDGES
    size = sum(f.numel() * f.element_size() for f in state["features"])
    assert size < 10000 * 10000 * 4 / 1000  # features, not the M x M Gram matrix
    assert "w_rand" not in run.model.state_dict()  # regenerated from the seed


class _StateSizes(RanPAC):
    """RanPAC recording, after every task, its checkpointed state's tensor bytes (lambdas aside), the images seen
    and the size of its features and of G and Q at that point."""

    def __init__(self, params=None) -> None:
        super().__init__(params)
        self.sizes: list[tuple[int, int, int, int]] = []
        self.seen = self.feature_bytes = 0

    @hookimpl
    def after_task(self, model, ctx):
        super().after_task(model, ctx)
        n = sum(len(y) for _, y in ctx.loader())
        self.seen += n
        self.feature_bytes += n * (model.backbone.num_features * 4 + 8)
        state = self.method_state(ctx)
        kept = sum(v.numel() * v.element_size() for k, v in state.items() if k not in ("features", "labels", "lambdas"))
        kept += sum(t.numel() * t.element_size() for k in ("features", "labels") for t in state.get(k, []))
        self.sizes.append((kept, self.seen, self.feature_bytes, self.gram_bytes(len(ctx.seen_classes))))


def test_ranpac_state_stops_growing_past_the_break_even_and_the_classifier_is_unchanged():
    """The state is the smaller of the features and (G, Q): it grows with the images seen until the features
    outweigh G and Q (here after task 2, 144 images for M = 56), then holds G's triangle and Q only, whose size no
    longer depends on the images seen (Q gains its M x 2 columns per task of 2 new classes); and the classifier
    summed task by task is the ridge solution over all the stream's features at once."""
    M, stream = 56, tiny_stream(num_tasks=6, num_classes=12)  # 48 images per task, tiny ViT d = 32
    run = run_method(_StateSizes({"M": M}), stream)
    sizes = run.method.sizes
    for kept, _seen, feature_bytes, gram_bytes in sizes:
        assert kept == (feature_bytes if feature_bytes <= gram_bytes else gram_bytes + 8)  # + a task count
    switch = next(t for t, (_, _, fb, gb) in enumerate(sizes) if fb > gb)
    assert switch == 2 and sizes[switch][1] > M and run.method.features is None
    q_bytes = M * 2 * 8  # two classes per task
    assert all(sizes[t + 1][0] - sizes[t][0] == q_bytes for t in range(switch, len(sizes) - 1))
    assert sizes[-1][0] < sizes[switch - 1][2] + 6 * q_bytes  # below the features it replaced, though 3x the images
    feats = backbone_features(stream)
    W_rand = random_projection(run.model.backbone.num_features, M, 0).double().numpy()
    H = np.maximum(np.concatenate([f for f, _ in feats]) @ W_rand, 0)
    Y = np.eye(12)[np.concatenate([y for _, y in feats])]
    G, Q = H.T @ H, H.T @ Y
    state = run.method.method_state(None)
    np.testing.assert_allclose(unpack_lower(state["gram"], M).numpy(), G, rtol=1e-5, atol=1e-6 * np.abs(G).max())
    np.testing.assert_allclose(state["Q"].numpy(), Q, rtol=1e-5, atol=1e-6 * np.abs(Q).max())
    Wo = scipy.linalg.solve(G + run.method.lambdas[-1] * np.eye(M), Q, assume_a="pos").T
    np.testing.assert_allclose(heads_matrix(run.model), Wo, rtol=2e-3, atol=1e-4 * np.abs(Wo).max())


@pytest.mark.parametrize("after", [1, 3])  # 32 images per task, M = 40: G and Q replace the features after task 1
def test_ranpac_resumes_bit_exactly_from_either_state(after):
    assert_resumes(RanPAC, {"M": 40}, after=after, num_tasks=4)


FIRST_SESSION = {"M": 64, "first_session_adaptation": True, "rank": 2}


def test_ranpac_first_session_adaptation_trains_the_first_task_only():
    stream = tiny_stream(num_tasks=3, num_classes=6)
    run = run_method(RanPAC(FIRST_SESSION), stream)
    first, later = run.results[0], run.results[1:]
    assert first.loss is not None and first.trainable_params > 0 and first.images > 0
    assert all(r.loss is None and r.trainable_params == 0 and r.images == 0 for r in later)
    B = [s.branches[0].B for s in run.method.sites.values()]
    assert any(float(b.abs().max()) > 0 for b in B)  # LoRA's B starts at zero: the first session trained it
    # the heads are the ridge solution over the *adapted* backbone's features, projected
    feats = backbone_features(stream, model=run.model)
    W_rand = random_projection(run.model.backbone.num_features, 64, 0).double().numpy()
    H = np.maximum(np.concatenate([f for f, _ in feats]) @ W_rand, 0)
    Y = np.eye(6)[np.concatenate([y for _, y in feats])]
    Wo = scipy.linalg.solve(H.T @ H + run.method.lambdas[-1] * np.eye(64), H.T @ Y, assume_a="pos").T
    np.testing.assert_allclose(heads_matrix(run.model), Wo, rtol=2e-3, atol=1e-4 * np.abs(Wo).max())


def test_ranpac_first_session_adaptation_resumes_bit_exactly():
    assert_resumes(RanPAC, FIRST_SESSION, after=1, num_tasks=3)


# -- the no-gradient path through a whole run ------------------------------------------------------------------

def test_no_gradient_run_logs_method_time_and_state(tmp_path, monkeypatch):
    suite = tmp_path / "suite.yaml"
    text = tiny_suite_yaml("nograd").replace("  - {name: lora, label: inclora, params: {rank: 2, fresh_per_task: true}}\n",
                                             "  - {name: ranpac, params: {M: 64}}\n")
    suite.write_text(text)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["run", str(suite), "--method", "ranpac", "--method", "lora"])
    assert result.exit_code == 0, result.output
    runs = {r.data.tags[keys.METHOD]: r for r in mlflow_runs(uri, "nograd", role="child")}
    m = runs["ranpac"].data.metrics
    assert keys.TRAIN_LOSS not in m and keys.COST_IMG_PER_S not in m
    assert m[keys.COST_TRAINABLE_PARAMS] == 0 and m[keys.COST_TRAIN_SECONDS] == 0
    assert m[keys.COST_METHOD_SECONDS] > 0 and m[keys.COST_TOTAL_SECONDS] == m[keys.COST_METHOD_SECONDS]
    assert 0 < m[keys.COST_STATE_MB] < 64 * 64 * 4 / 2**20  # the stored features, well below a 64 x 64 Gram
    assert m[keys.COST_CHECKPOINT_MB] > m[keys.COST_STATE_MB]
    lora = runs["lora"].data.metrics
    assert lora[keys.COST_TOTAL_SECONDS] == pytest.approx(lora[keys.COST_TRAIN_SECONDS] +
                                                          lora[keys.COST_METHOD_SECONDS])
    assert keys.TRAIN_LOSS in lora and lora[keys.COST_STATE_MB] == 0
    board = CliRunner().invoke(app, ["leaderboard", "nograd"])
    assert board.exit_code == 0, board.output
    assert "no continual training" in board.output and "total_s: cost/total_seconds" in board.output


def test_methods_listing_says_they_train_nothing_by_gradient():
    from clbench.methods.method import training_summary

    assert training_summary(SimpleCIL).startswith("nothing by gradient (gradient_training = False)")
    assert training_summary(RanPAC).startswith("nothing by gradient with default params")
