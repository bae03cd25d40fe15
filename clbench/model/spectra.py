"""Singular-value spectra of low-rank updates, computed from their factors, and the imbalance indices.

For ``delta W = B A`` (B: d_out x r, A: r x d_in) take thin QR factorisations ``B = Qb Rb`` and
``A^T = Qa Ra``; then ``delta W = Qb (Rb Ra^T) Qa^T`` and the singular values of delta W are those of the
small r x r core ``Rb Ra^T``. Cost O((d_out + d_in) r^2) instead of a dense SVD's O(d_out d_in min(d)).
The right singular vectors (the update's input-side subspace) are ``Qa V`` with V from the core's SVD.

Indices of a spectrum s (zero singular values contribute nothing):

* ``top1_share = s1^2 / sum s^2``  (1/r for a flat rank-r spectrum, 1 for a single spike)
* ``eff_rank = exp(H(p))`` with ``p = s^2 / sum s^2``  (r flat, 1 spike)
* ``stable_rank = sum s^2 / s1^2``
* ``overlap(U, V) = ||U^T V||_F^2 / dim U`` for orthonormal bases: the mean squared cosine of the principal
  angles between the update's input subspace and the earlier updates' (0 orthogonal, 1 contained).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from clbench.model.lora import LowRank

REL_TOL = 1e-6  # singular values below REL_TOL * s1 are treated as zero (rank-deficient factors)


def _core(u: LowRank) -> tuple[torch.Tensor, ...]:
    """(Qb, U, S, Vh, Qa) with delta W = (Qb U) diag(S) (Qa Vh^T)^T."""
    B, A = u.B.detach().double(), u.A.detach().double()
    Qb, Rb = torch.linalg.qr(B, mode="reduced")
    Qa, Ra = torch.linalg.qr(A.t(), mode="reduced")
    U, S, Vh = torch.linalg.svd(Rb @ Ra.t(), full_matrices=False)
    return Qb, U, S, Vh, Qa


def singular_values(u: LowRank) -> torch.Tensor:
    """All min(r, d_out, d_in) singular values of B @ A, descending, in float64."""
    B, A = u.B.detach().double(), u.A.detach().double()
    _, Rb = torch.linalg.qr(B, mode="reduced")
    _, Ra = torch.linalg.qr(A.t(), mode="reduced")
    return torch.linalg.svdvals(Rb @ Ra.t())


def significant(S: torch.Tensor, rel_tol: float = REL_TOL) -> int:
    """How many singular values (descending) are above ``rel_tol * s1``: the numerical rank."""
    return int((S > rel_tol * S[0]).sum()) if S.numel() and S[0] > 0 else 0


def input_basis(u: LowRank, rel_tol: float = REL_TOL) -> torch.Tensor:
    """Orthonormal basis (d_in x k) of the update's row space, significant directions only."""
    _, _, S, Vh, Qa = _core(u)
    return Qa @ Vh[: significant(S, rel_tol)].t()


def top1_share(s: torch.Tensor | np.ndarray) -> float:
    s2 = np.asarray(s, dtype=float) ** 2
    total = s2.sum()
    return float(s2.max() / total) if total > 0 else float("nan")


def eff_rank(s: torch.Tensor | np.ndarray) -> float:
    s2 = np.asarray(s, dtype=float) ** 2
    total = s2.sum()
    if total <= 0:
        return float("nan")
    p = s2[s2 > 0] / total
    return float(math.exp(-(p * np.log(p)).sum()))


def stable_rank(s: torch.Tensor | np.ndarray) -> float:
    s2 = np.asarray(s, dtype=float) ** 2
    return float(s2.sum() / s2.max()) if s2.max() > 0 else float("nan")


def overlap(U: torch.Tensor, V: torch.Tensor) -> float:
    """Mean squared cosine of the principal angles between span(U) and span(V) (orthonormal columns),
    normalised by dim U: 1 when span(U) lies in span(V), 0 when orthogonal."""
    if U.shape[1] == 0 or V.shape[1] == 0:
        return 0.0
    return float((U.t().double() @ V.double()).pow(2).sum() / U.shape[1])


def extend_basis(V: torch.Tensor | None, U: torch.Tensor, rel_tol: float = 1e-8) -> torch.Tensor:
    """Orthonormal basis of span(V) + span(U)."""
    if V is None or V.shape[1] == 0:
        return U.double()
    R = U.double() - V @ (V.t() @ U.double())
    if R.shape[1] == 0:
        return V
    Q, S, _ = torch.linalg.svd(R, full_matrices=False)
    keep = S > rel_tol * max(1.0, float(S.max()) if S.numel() else 1.0)
    return torch.cat([V, Q[:, keep]], 1)[:, : V.shape[0]]


class SpectraTracker:
    """Per run: the spectra of each task's update per layer, the cumulative update, and overlaps.

    Call :meth:`add_task` with ``task_updates``' result after every task; it returns the per-task summary
    metrics (``spectra/*``) and keeps the per-layer values for the artifact (:meth:`arrays`).
    """

    def __init__(self) -> None:
        self.layers: list[str] = []
        self.task_values: list[dict[str, np.ndarray]] = []  # per task: layer -> singular values
        self.cumulative: dict[str, LowRank] = {}
        self.cum_values: list[dict[str, np.ndarray]] = []
        self.bases: dict[str, torch.Tensor] = {}
        self.layer_metrics: list[dict[str, dict[str, float]]] = []

    def add_task(self, updates: dict[str, LowRank]) -> dict[str, float]:
        if not self.layers:
            self.layers = sorted(updates)
        values, cvalues, per_layer = {}, {}, {}
        for name, u in sorted(updates.items()):
            _, _, S, Vh, Qa = _core(u)  # one factorisation gives the spectrum and the input subspace
            s = S.cpu().numpy()
            values[name] = s
            basis = Qa @ Vh[: significant(S)].t()
            prev = self.bases.get(name)
            ov = overlap(basis, prev) if prev is not None else float("nan")
            self.bases[name] = extend_basis(prev, basis)
            cum = self.cumulative.get(name)
            self.cumulative[name], cs = _compress(u if cum is None else LowRank.sum([cum, u]))
            cvalues[name] = cs.cpu().numpy()
            per_layer[name] = {"top1_share": top1_share(s), "eff_rank": eff_rank(s), "stable_rank": stable_rank(s),
                               "overlap": ov, "norm": float(np.sqrt((s ** 2).sum()))}
        self.task_values.append(values)
        self.cum_values.append(cvalues)
        self.layer_metrics.append(per_layer)
        out = {}
        for key in ("top1_share", "eff_rank", "stable_rank", "overlap"):
            vals = [m[key] for m in per_layer.values() if not math.isnan(m[key])]
            if vals:
                out[f"spectra/{key}"] = float(np.mean(vals))
        cum_t1 = [top1_share(v) for v in cvalues.values()]
        if cum_t1:
            out["spectra/cum_top1_share"] = float(np.nanmean(cum_t1))
        return out

    def arrays(self) -> dict[str, np.ndarray]:
        """Compact arrays for the artifact: ``task_sv[t, layer, k]`` (NaN-padded), cumulative the same."""
        def stack(rows: list[dict[str, np.ndarray]]) -> np.ndarray:
            width = max((len(v) for r in rows for v in r.values()), default=0)
            arr = np.full((len(rows), len(self.layers), width), np.nan)
            for t, r in enumerate(rows):
                for li, name in enumerate(self.layers):
                    if name in r:
                        arr[t, li, : len(r[name])] = r[name]
            return arr

        keys = ("top1_share", "eff_rank", "stable_rank", "overlap")
        lm = np.array([[[m.get(n, {}).get(k, np.nan) for k in keys] for n in self.layers] for m in self.layer_metrics])
        return {"layers": np.array(self.layers), "task_sv": stack(self.task_values),
                "cumulative_sv": stack(self.cum_values), "layer_metrics": lm, "layer_metric_names": np.array(keys)}


def _compress(u: LowRank) -> tuple[LowRank, torch.Tensor]:
    """Re-factor B A to its exact rank (<= min(d_out, d_in)) so cumulative factors stay small; also return
    the singular values."""
    Qb, U, S, Vh, Qa = _core(u)
    keep = significant(S)
    B = (Qb @ U[:, :keep]) * S[:keep]
    A = (Qa @ Vh[:keep].t()).t()
    return LowRank(B.to(u.B.dtype), A.to(u.A.dtype)), S


def reshape_spectrum(u: LowRank, spectrum: str, power: float = 2.0, norm: str = "frobenius",
                     rel_tol: float = REL_TOL) -> LowRank:
    """The update ``U diag(S') V^T`` with the same singular subspaces as ``u = U diag(S) V^T`` and a new spectrum
    S' on its numerical rank k (singular values below ``rel_tol * s1`` stay zero), from the factors (thin QRs and
    the r x r core's SVD, as :func:`_core`; no dense SVD). Used by the claim interventions (plugins/lora.py).

    * ``flat``: every S'_i equal; ``norm="frobenius"`` keeps ``||S'||_2 = ||S||_2`` (S'_i = the RMS of S),
      ``norm="nuclear"`` keeps ``sum S' = sum S`` (S'_i = the mean of S);
    * ``sharpen``: ``S' = S^power`` rescaled to the same Frobenius (or nuclear) norm; power > 1 moves energy to
      the top direction.

    The result is rank k, with factors ``B' = U_k diag(S')`` (d_out x k) and ``A' = V_k^T`` (k x d_in), in the
    input's dtype. A zero update is returned unchanged.
    """
    Qb, U, S, Vh, Qa = _core(u)
    k = significant(S, rel_tol)
    if k == 0:
        return u
    s = S[:k]
    if spectrum == "flat":
        new = torch.full_like(s, 1.0)
    elif spectrum == "sharpen":
        new = (s / s[0]) ** power  # divided by s1 first: the power cannot overflow
    else:
        raise ValueError(f"unknown spectrum intervention {spectrum!r}; choose flat or sharpen")
    if norm == "frobenius":
        new = new * (s.norm() / new.norm())
    elif norm == "nuclear":
        new = new * (s.sum() / new.sum())
    else:
        raise ValueError(f"unknown norm {norm!r}; choose frobenius or nuclear")
    B = (Qb @ U[:, :k]) * new
    A = (Qa @ Vh[:k].t()).t()
    return LowRank(B.to(u.B.dtype), A.to(u.A.dtype))
