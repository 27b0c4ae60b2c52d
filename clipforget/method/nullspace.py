"""Closed-form multimodal nullspace projections (arXiv 2512.14113, docs/DESIGN.md, step 4).

Forget embeddings are the columns of F [d, n_f], retain embeddings the columns of R [d, n_r].

- soft (ridge): P = (I + μ R W_r Rᵀ)(I + λ F W_f Fᵀ + μ R W_r Rᵀ)⁻¹, the unique minimizer of
  ‖P − I‖² + λ‖P F W_f^½‖² + μ‖(P R − R) W_r^½‖²; per-column weights W let some columns count more
  (e.g. the same class in kept domains, in `domain` mode).
- hard: P = I − U Uᵀ, U an orthonormal basis of the part of F orthogonal to the dominant retain
  subspace (energy cuts on both SVDs), so P removes forget directions exactly and leaves the
  dominant retain subspace untouched.

Applied to unnormalized image features h (h' = P h) and folded into the image tower by `fold`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

Kind = Literal["soft", "hard", "margin", "gated"]


@dataclass(frozen=True)
class Projection:
    """A fitted projection P [d, d] (float64) and how it was built."""

    P: torch.Tensor
    kind: Kind
    params: dict[str, float] = field(default_factory=dict)
    rank_removed: int | None = None  # hard: dimension of the removed subspace
    condition: float | None = None  # soft: condition number of the solved system

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        """Project features h [..., d] (rows): h' = h Pᵀ."""
        return h @ self.P.T.to(h.dtype).to(h.device)

    @property
    def dim(self) -> int:
        return self.P.shape[0]

    def summary(self) -> dict[str, object]:
        return {"kind": self.kind, "params": self.params, "rank_removed": self.rank_removed,
                "condition": self.condition, "dim": self.dim}


def _weighted(M: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """Columns scaled by sqrt(weight), so that M' M'ᵀ = M W Mᵀ."""
    M = M.to(torch.float64)
    if w is None:
        return M
    w = torch.as_tensor(w, dtype=torch.float64)
    if w.shape != (M.shape[1],) or (w < 0).any():
        raise ValueError(f"column weights must be {M.shape[1]} non-negative numbers, got shape {tuple(w.shape)}")
    return M * w.sqrt()[None]


def _check(F: torch.Tensor, R: torch.Tensor) -> None:
    if F.ndim != 2 or R.ndim != 2 or F.shape[0] != R.shape[0]:
        raise ValueError(f"F and R must be [d, n] with the same d, got {tuple(F.shape)} and {tuple(R.shape)}")
    if F.shape[1] == 0:
        raise ValueError("the forget set F is empty")
    if not (torch.isfinite(F).all() and torch.isfinite(R).all()):
        raise ValueError("F or R holds non-finite values")


def soft_projection(
    F: torch.Tensor,
    R: torch.Tensor,
    lam: float = 100.0,
    mu: float = 10.0,
    forget_weights: torch.Tensor | None = None,
    retain_weights: torch.Tensor | None = None,
) -> Projection:
    """Ridge projection P = (I + μRRᵀ)(I + λFFᵀ + μRRᵀ)⁻¹ with weighted columns."""
    _check(F, R)
    Fw, Rw = _weighted(F, forget_weights), _weighted(R, retain_weights)
    d = F.shape[0]
    eye = torch.eye(d, dtype=torch.float64)
    RRt = Rw @ Rw.T
    B = eye + mu * RRt
    A = B + lam * (Fw @ Fw.T)
    A = (A + A.T) / 2  # exact symmetry lost to rounding would make Cholesky fail for no reason
    # A is symmetric positive definite (I + PSD terms), so Cholesky is stable; P = B A⁻¹ = (A⁻¹ B)ᵀ
    L = torch.linalg.cholesky(A)
    P = torch.cholesky_solve(B, L).T
    eig = torch.linalg.eigvalsh(A)
    return Projection(P.contiguous(), "soft", {"lam": lam, "mu": mu}, condition=float(eig[-1] / eig[0]))


def _energy_rank(s: torch.Tensor, energy: float) -> int:
    """Smallest k whose top-k singular values hold `energy` of the total squared energy."""
    if s.numel() == 0 or s[0] <= 0:
        return 0
    e = (s**2).cumsum(0) / (s**2).sum()
    return int(torch.searchsorted(e, torch.tensor(energy, dtype=e.dtype)).item()) + 1


def hard_projection(
    F: torch.Tensor,
    R: torch.Tensor,
    energy: float = 0.95,
    retain_energy: float = 0.9,
    forget_weights: torch.Tensor | None = None,
    retain_weights: torch.Tensor | None = None,
    max_rank: int | None = None,
) -> Projection:
    """Orthogonal projection P = I − UUᵀ removing F's directions outside the dominant retain subspace."""
    _check(F, R)
    Fw, Rw = _weighted(F, forget_weights), _weighted(R, retain_weights)
    d = F.shape[0]
    if Rw.shape[1] and retain_energy > 0:
        Ur, sr, _ = torch.linalg.svd(Rw, full_matrices=False)
        Ur = Ur[:, : _energy_rank(sr, retain_energy)]
        Fp = Fw - Ur @ (Ur.T @ Fw)  # the part of F the retain set does not need
    else:
        Fp = Fw
    Uf, sf, _ = torch.linalg.svd(Fp, full_matrices=False)
    # directions with negligible singular values are rounding noise, not forget directions: negligible next to
    # the top one, and next to F itself (when F lies inside the retain subspace, Fp is all rounding noise)
    floor = 1e-9 * float(torch.linalg.matrix_norm(Fw, ord=2)) if Fw.numel() else 0.0
    keep = sf > max(float(sf[0]) * 1e-6, floor) if sf.numel() and sf[0] > 0 else torch.zeros_like(sf, dtype=torch.bool)
    k = min(_energy_rank(sf[keep], energy), int(keep.sum()))
    if max_rank is not None:
        k = min(k, max_rank)
    U = Uf[:, :k]
    P = torch.eye(d, dtype=torch.float64) - U @ U.T
    params = {"energy": energy, "retain_energy": retain_energy}
    return Projection(P.contiguous(), "hard", params, rank_removed=k)
