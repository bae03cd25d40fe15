"""RanPAC (``ranpac``): a ridge classifier on random-projected frozen features; no continual training.

McDonnell, Gong, Parvaneh, Abbasnejad, van den Hengel, "RanPAC: Random Projections and Pre-trained Models for
Continual Learning", NeurIPS 2023, arXiv 2307.02251. Official code: github.com/RanPAC/RanPAC (``RanPAC.py``:
``Learner.setup_RP``, ``Learner.replace_fc``, ``Learner.optimise_ridge_parameter``; ``inc_net.py:
CosineLinear.forward`` with ``use_RP``; defaults from ``args/*_publish.csv``: M = 10000).

The algorithm (official ``replace_fc``, with ``use_RP`` and M > 0): a fixed random matrix ``W_rand`` (d x M,
standard normal) projects the backbone's pooled feature f to ``h = ReLU(f W_rand)``. Over every seen training
image (read without augmentation, the official ``train_loader_for_CPs``) it accumulates the Gram matrix
``G = sum h h^T`` (M x M) and the class-prototype matrix ``Q = sum h y^T`` (M x C, y one-hot). After each task the
classifier is the ridge solution ``W_o = (G + lambda I)^-1 Q`` over all seen classes, and an image scores
``h^T W_o`` (no bias, no normalisation: ``CosineLinear.forward`` with ``use_RP`` and sigma 1). ``lambda`` is
chosen per task as the official ``optimise_ridge_parameter`` does: over ``10^-8 .. 10^8`` (``10.0 **
np.arange(-8, 9)``), on the *current task's* features only, in the CP loader's shuffled order, the first
``int(0.8 N)`` rows fit the ridge and the rest are scored by the mean squared error against their one-hot
labels; the smallest error wins (the first on ties, ``np.argmin``). Old classes' columns of Q never change
after their task; their weights do (the whole W_o is re-solved), which is what decorrelates the classes.

On the clbench contract: no gradient step (``gradient_training`` is False on every task, or True on the first one
only with ``first_session_adaptation``); ``configure_model`` returns :class:`RPModel`, a
``CLModel`` around the same frozen backbone whose features are ``h`` and whose heads are M-wide, so the loop's
evaluation is the official inference; ``after_task`` recomputes and writes every seen task's head.

Compact state, bounded: the method keeps whichever is smaller, (a) the backbone features F (N x d, float32) and
labels of every seen training image, or (b) G (its lower triangle, all a Cholesky factorisation reads:
M (M + 1) / 2 float64) and Q (M x C) - never both in the checkpoint. It starts with (a) and switches for good
to (b) after the task where F outweighs G and Q, so the state is at most the size of G and Q whatever the number
of images seen (for ViT-B, d = 768, and M = 10000: F is smaller below about 130,000 training images; Split
CIFAR-100 has 50,000, 154 MB; DomainNet about 410,000, kept as G and Q: 428 MB). ``W_rand`` is regenerated from
the run's seed (a non-persistent buffer, not in the checkpoint). The current task's features serve lambda's
search only (official: ``optimise_ridge_parameter`` on the current task), then are summed or kept as above.

Solves and their cost per task: when the stream is expected to reach M images (the images seen so far per task
times the number of tasks, decided from the first task on), every task is summed into G and Q once (``2 N_t
M^2``) and the classifier is the Cholesky solve of ``G + lambda I`` (``M^3 / 3``): the official per-task cost,
flat in the task index; nothing is recomputed from earlier tasks' features (after a resume from (a), G and Q are
summed again from F once, in the same order, to the same bits). Otherwise (a short stream: N stays below M) the
same W_o is solved in the dual form ``W_o = H^T (H H^T + lambda I)^-1 Y`` by Cholesky of the N x N kernel, whose
task blocks are kept in memory, and no M x M matrix is ever formed. lambda's search diagonalises once (``eigh``
of the split's kernel ``H H^T`` when it has fewer rows than M, else of ``H^T H``) and evaluates every lambda
from it.

Deviations: (1) solves run in float64 (the official ones in float32, where lambda = 1e-8 against a rank-deficient
G is numerically meaningless); (2) lambda is searched by one eigendecomposition instead of 17 dense solves
(the same minimiser up to rounding); (3) the dual form for a stream of fewer than M images (the same solution); (4) ``W_rand`` is drawn from
a generator seeded by the run's seed, not from the global stream after first-session training; (5) the MSE of the
lambda search is over the seen classes' one-hot columns, not all of the stream's (the unseen columns add zero
error, so only the scale differs and the argmin is the same); (6) first-session adaptation (off by default, as in
the official ``ncm`` + RP rows of ``args/*_publish.csv``) trains LoRA adapters (the ``rank``/``targets``/``blocks``
params) and task 0's linear head with the suite's optimizer, epochs and cross-entropy, then freezes them and
replaces that head by the projected one; the official code trains an AdaptFormer adapter, SSF or VPT with its own
SGD schedule and a cosine head (no LoRA variant exists there); the adapted backbone's update is not reported for
spectra (``task_updates`` is ``{}``); (7) features are
computed under the suite's precision (bf16 autocast on CUDA), as clbench's evaluation computes them.
"""

from __future__ import annotations

import numpy as np
import torch
from clbench_plugins.simplecil import extract
from pydantic import Field, field_validator

from clbench import CLModel, LoRAParams, Method, hookimpl, inject

OFFICIAL_RIDGES = [float(x) for x in 10.0 ** np.arange(-8, 9)]  # RanPAC.py: optimise_ridge_parameter
CHUNK = 4096  # rows of H formed at a time when building G


class RanPACParams(LoRAParams):
    """RanPAC's params; the LoRA fields (rank, targets, blocks, alpha, dropout) shape the first-session adapters and
    are unused without ``first_session_adaptation``."""

    M: int = Field(10000, ge=1, description="random projection dimension (official default 10000, "
                                            "args/*_publish.csv)")
    ridges: list[float] = Field(default_factory=lambda: list(OFFICIAL_RIDGES),
                                description="the lambda grid of the ridge search (official: 10^-8 .. 10^8)")
    val_fraction: float = Field(0.8, gt=0, lt=1, description="share of the current task's images that fit the "
                                "ridge in the lambda search; the rest score it (official 0.8)")
    first_session_adaptation: bool = Field(False, description="train LoRA adapters (rank, targets, blocks) and "
                                           "task 0's head by gradient on the first task only, then freeze them "
                                           "(official: a PETL adapter/SSF/VPT); false = the official ncm + RP rows")

    @field_validator("ridges")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if not v or min(v) <= 0:
            raise ValueError("ridges must be a non-empty list of positive numbers")
        return v


class RPModel(CLModel):
    """A CLModel around the same backbone whose features are ``ReLU(f W_rand)`` (M-wide heads, no bias use)."""

    def __init__(self, base: CLModel, w_rand: torch.Tensor, projecting: bool = True) -> None:
        super().__init__(base.backbone, base.image_size, base.in_chans, base.mean.flatten().tolist(),
                         base.std.flatten().tolist())
        self.heads = base.heads
        self.register_buffer("w_rand", w_rand, persistent=False)  # regenerated from the seed, never saved
        self.projecting = projecting  # False only while the first session adapts (plain features, d-wide head)

    @property
    def feature_dim(self) -> int:
        return self.w_rand.shape[1] if self.projecting else self.backbone.num_features

    def start_projecting(self) -> None:
        """After the first session: project from now on, every existing head replaced by an M-wide one."""
        self.projecting = True
        for i, head in enumerate(self.heads):
            if head.in_features != self.feature_dim:
                new = torch.nn.Linear(self.feature_dim, head.out_features).to(self.w_rand.device)
                new.bias.data.zero_()
                new.requires_grad_(False)
                self.heads[i] = new

    def add_head(self, num_classes: int) -> torch.nn.Linear:
        head = super().add_head(num_classes)
        head.bias.data.zero_()  # the official RP head has no bias
        return head

    def features(self, x: torch.Tensor) -> torch.Tensor:
        f = self.backbone(x)
        return torch.relu(f @ self.w_rand.to(f.dtype)) if self.projecting else f


def random_projection(d: int, M: int, seed: int) -> torch.Tensor:
    """``W_rand`` (d x M, standard normal) from a generator of the run's seed."""
    return torch.randn(d, M, generator=torch.Generator().manual_seed(seed * 7_919 + 104_729))


def project(F: torch.Tensor, w_rand: torch.Tensor) -> torch.Tensor:
    """``H = ReLU(F W_rand)`` in float64."""
    return torch.relu(F.double() @ w_rand.double())


def one_hot(labels: torch.Tensor, C: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels, C).double()


def choose_ridge(H: torch.Tensor, Y: torch.Tensor, ridges: list[float], fraction: float = 0.8) -> float:
    """The official ``optimise_ridge_parameter``: the first ``int(fraction N)`` rows fit ``(G + l I)^-1 Q``, the
    rest score it by mean squared error; the grid's minimiser (the first on ties). One eigendecomposition serves
    every lambda: of the kernel ``H_t H_t^T`` when the fitting rows are fewer than M, else of ``H_t^T H_t``."""
    n = int(H.shape[0] * fraction)
    Ht, Hv, Yt, Yv = H[:n], H[n:], Y[:n], Y[n:]
    if n < H.shape[1]:  # W = H_t^T (K + l I)^-1 Y_t, K = H_t H_t^T = U S U^T
        s, U = torch.linalg.eigh(Ht @ Ht.T)
        A, B = (Hv @ Ht.T) @ U, U.T @ Yt
    else:  # W = (G + l I)^-1 Q, G = H_t^T H_t = V S V^T
        s, V = torch.linalg.eigh(Ht.T @ Ht)
        A, B = Hv @ V, V.T @ (Ht.T @ Yt)
    s = s.clamp_min(0)
    losses = [float(((A / (s + lam)) @ B - Yv).pow(2).mean()) for lam in ridges]
    return ridges[int(np.argmin(np.array(losses)))]


def pack_lower(G: torch.Tensor) -> torch.Tensor:
    """The lower triangle of ``G`` (rows in order, ``M (M + 1) / 2`` values) on the CPU: all the Cholesky
    factorisation reads (``torch.linalg.cholesky`` uses the lower triangle only)."""
    G = G.cpu()
    return torch.cat([G[i, :i + 1] for i in range(G.shape[0])])


def unpack_lower(v: torch.Tensor, M: int) -> torch.Tensor:
    """The symmetric M x M matrix whose lower triangle :func:`pack_lower` wrote."""
    G, start = torch.zeros(M, M, dtype=v.dtype), 0
    for i in range(M):
        G[i, :i + 1] = v[start:start + i + 1]
        start += i + 1
    return G + G.tril(-1).T


class Gram:
    """The ridge system: ``G = sum H^T H`` and ``Q = sum H^T Y`` (float64) accumulated task by task in task
    order (``tasks`` of them so far), and, for the dual form, the kernel's task blocks ``H_i H_j^T`` (in memory
    only). Every value is computed task block by task block in task order, so an accumulated value and the
    recomputation of a resumed run are the same bits; a new task costs its own blocks only."""

    def __init__(self) -> None:
        self.blocks: dict[tuple[int, int], torch.Tensor] = {}
        self.G: torch.Tensor | None = None
        self.Q: torch.Tensor | None = None
        self.tasks = 0  # tasks summed into G and Q

    def accumulate(self, feats: list[torch.Tensor], labels: list[torch.Tensor], C: int, w_rand: torch.Tensor) -> None:
        """Add the tasks ``feats`` (N_t x d backbone features, on the solve's device; stream-wide ``labels``) to
        G and Q, in row chunks; Q gains zero columns for classes new since the last call. A task's products have
        its own shapes only, so summing it now or in a resumed run's catch-up gives the same bits."""
        M, dev = w_rand.shape[1], w_rand.device
        if self.G is None:
            self.G = torch.zeros(M, M, dtype=torch.float64, device=dev)
            self.Q = torch.zeros(M, 0, dtype=torch.float64, device=dev)
        self.Q = torch.cat([self.Q, self.Q.new_zeros(M, C - self.Q.shape[1])], 1)  # new classes: zero so far
        for F, y in zip(feats, labels):
            lo, hi = int(y.min()), int(y.max()) + 1  # the task's own classes: the same products whatever C is
            Y = one_hot(y - lo, hi - lo)
            for i in range(0, len(F), CHUNK):
                Hc = project(F[i:i + CHUNK], w_rand)
                self.G += Hc.T @ Hc
                self.Q[:, lo:hi] += Hc.T @ Y[i:i + CHUNK]
            self.tasks += 1

    def solve_primal(self, lam: float) -> torch.Tensor:
        """``W_o^T = (G + lam I)^-1 Q`` (M x C, float64) by Cholesky."""
        A = self.G.clone()
        A.diagonal().add_(lam)
        return torch.cholesky_solve(self.Q, torch.linalg.cholesky(A))

    def solve_dual(self, feats: list[torch.Tensor], labels: list[torch.Tensor], C: int, w_rand: torch.Tensor,
                   lam: float) -> torch.Tensor:
        """The same matrix in the dual form ``H^T (H H^T + lam I)^-1 Y`` over ``feats`` (per task, N_t x d)."""
        Hs = [project(f, w_rand) for f in feats]
        T = len(Hs)
        for i in range(T):
            for j in range(i + 1):
                if (i, j) not in self.blocks:
                    self.blocks[(i, j)] = Hs[i] @ Hs[j].T
        K = torch.cat([torch.cat([self.blocks[(i, j)] if j <= i else self.blocks[(j, i)].T for j in range(T)], 1)
                       for i in range(T)])
        K.diagonal().add_(lam)
        alpha = torch.cholesky_solve(torch.cat([one_hot(y, C) for y in labels]), torch.linalg.cholesky(K))
        W, start = torch.zeros(w_rand.shape[1], alpha.shape[1], dtype=torch.float64, device=alpha.device), 0
        for H in Hs:
            W += H.T @ alpha[start:start + len(H)]
            start += len(H)
        return W


class RanPAC(Method):
    name = "ranpac"
    paper = ("McDonnell et al., RanPAC: Random Projections and Pre-trained Models for Continual Learning, "
             "NeurIPS 2023 (arXiv 2307.02251)")
    code = "github.com/RanPAC/RanPAC (RanPAC.py)"
    low_rank_updates = False
    Params = RanPACParams
    backbones = ("image",)
    backbones_note = ("its random projection and ridge classifier replace the linear head over the ViT's pooled "
                      "image features; a language model answers with label words, not a linear head")

    def __init__(self, params=None) -> None:
        super().__init__(params)
        # the kept form, whichever is smaller: per task the backbone features (N_t x d, float32, in the CP
        # loader's shuffled order) and stream-wide labels of every seen image; or, once those outweigh G and Q,
        # None, and G and Q (self.gram) are the state
        self.features: list[torch.Tensor] | None = []
        self.labels: list[torch.Tensor] | None = []
        self.lambdas: list[float] = []  # the ridge chosen after each task
        self.gram = Gram()  # G and Q are checkpointed only once the features are dropped; else recomputed on resume

    def gram_bytes(self, C: int) -> int:
        """The checkpointed size of G (its lower triangle) and Q, float64."""
        M = self.params.M
        return (M * (M + 1) // 2 + M * C) * 8

    def primal(self, num_tasks: int) -> bool:
        """Whether G and Q are accumulated and solved (the official M x M form, a flat cost per task): once the
        features are dropped, or from the first task after which the stream is expected to reach M images (the
        images seen so far per task times the number of tasks). Otherwise the N x N dual form, cheaper while
        N < M (which the forecast guarantees), and no G at all. A function of the kept features' sizes, so a
        resumed run decides every task as the uninterrupted one did."""
        if self.features is None:
            return True
        seen = 0
        for t, f in enumerate(self.features):
            seen += len(f)
            if seen * num_tasks >= self.params.M * (t + 1):
                return True
        return False

    def gradient_training(self, ctx) -> bool:
        """Only the first task trains, and only with first-session adaptation (clbench.run.loop.takes_gradient_steps)."""
        return self.params.first_session_adaptation and ctx.task == 0

    @hookimpl
    def configure_model(self, model, ctx):
        model.backbone.requires_grad_(False)
        w_rand = random_projection(model.feature_dim, self.params.M, ctx.seed)
        p, self.sites = self.params, {}
        if p.first_session_adaptation:
            self.sites = inject(model.backbone, p.targets, p.blocks)
            for site in self.sites.values():
                site.add_branch(p.rank, scale=p.scale, dropout=p.dropout)
        return RPModel(model, w_rand.to(ctx.device), projecting=not p.first_session_adaptation)

    @hookimpl
    def param_groups(self, model, ctx):  # the first session only (gradient_training)
        return [{"params": [q for s in self.sites.values() for q in s.branches[0].parameters()], "name": "lora"}]

    @hookimpl
    def task_updates(self, model, ctx):
        return {}  # the frozen (or first-session-adapted, then frozen) backbone: no continual update

    @hookimpl
    def after_task(self, model, ctx):
        if not model.projecting:  # the first session's adapters are trained: freeze them, project from now on
            for site in self.sites.values():
                site.requires_grad_(False)
            model.start_projecting()
        # the official CP loader shuffles; the order decides lambda's fit/score split, so it is seeded
        gen = torch.Generator().manual_seed(ctx.seed * 1_000_003 + ctx.task + 77)
        F, y = extract(model.backbone, ctx.loader(shuffle=True, generator=gen), ctx.autocast)  # unaugmented
        y = y + ctx.class_offset
        C, dev = len(ctx.seen_classes), ctx.device  # the solves run where the model runs (float64 throughout)
        w_rand = model.w_rand
        F_dev, y_dev = F.to(dev), y.to(dev)
        lam = choose_ridge(project(F_dev, w_rand), one_hot(y_dev, C), self.params.ridges, self.params.val_fraction)
        self.lambdas.append(lam)  # the current task's features serve lambda's search only (official)
        if self.features is not None:
            self.features.append(F)
            self.labels.append(y)
        if self.primal(ctx.num_tasks):  # accumulate, never recompute: each task is summed into G and Q once
            self.gram.blocks.clear()
            self._accumulate(F_dev, y_dev, C, w_rand)
            W = self.gram.solve_primal(lam)
        else:
            W = self.gram.solve_dual([f.to(dev) for f in self.features], [y.to(dev) for y in self.labels], C,
                                     w_rand, lam)
        if self.features is not None and \
                sum(f.numel() * 4 + y.numel() * 8 for f, y in zip(self.features, self.labels)) > self.gram_bytes(C):
            self._accumulate(F_dev, y_dev, C, w_rand)  # G and Q are the smaller state from now on
            self.features = self.labels = None
            self.gram.blocks.clear()
        with torch.no_grad():
            start = 0
            for head in model.heads[: ctx.task + 1]:
                n = head.out_features
                head.weight.copy_(W[:, start:start + n].T.to(head.weight))
                head.bias.zero_()
                start += n

    def _accumulate(self, F: torch.Tensor, y: torch.Tensor, C: int, w_rand: torch.Tensor) -> None:
        """Bring G and Q up to the current task: the kept features of tasks not summed yet (all of them after a
        resume), or the current task's alone once only G and Q are kept."""
        if self.features is None:
            self.gram.accumulate([F], [y], C, w_rand)
        else:
            dev = w_rand.device
            todo = range(self.gram.tasks, len(self.features))
            self.gram.accumulate([self.features[t].to(dev) for t in todo], [self.labels[t].to(dev) for t in todo],
                                 C, w_rand)

    @hookimpl
    def method_state(self, ctx):
        lambdas = torch.tensor(self.lambdas, dtype=torch.float64)
        if self.features is None:
            return {"gram": pack_lower(self.gram.G), "Q": self.gram.Q.cpu().clone(),
                    "tasks": torch.tensor(self.gram.tasks), "lambdas": lambdas}
        return {"features": [f.clone() for f in self.features], "labels": [y.clone() for y in self.labels],
                "lambdas": lambdas}

    @hookimpl
    def load_method_state(self, model, state, ctx):
        for site in self.sites.values():  # the first session is over once any task is
            site.requires_grad_(False)
        model.start_projecting()
        self.lambdas = [float(x) for x in state["lambdas"]]
        self.gram = Gram()
        if "gram" in state:
            dev = model.w_rand.device
            self.gram.G = unpack_lower(state["gram"], state["Q"].shape[0]).to(dev)
            self.gram.Q = state["Q"].clone().to(dev)
            self.gram.tasks = int(state["tasks"])
            self.features = self.labels = None
        else:
            self.features = [f.clone() for f in state["features"]]
            self.labels = [y.clone() for y in state["labels"]]


def register_methods(register):
    register(RanPAC)
