"""Property tests of the nullspace builder on random forget sets F and retain sets R (hypothesis): any shape,
scale, rank deficiency and overlap between the two gives a finite projection that keeps each solver's promise.

- soft (ridge): P minimizes J(P) = ‖P − I‖² + λ‖PF‖² + μ‖PR − R‖², so J(P) is at most J of any other map. Against
  P = I that bounds the retain change, μ‖PR − R‖² ≤ λ‖F‖²; against the orthogonal projector that removes F's span
  it bounds the forget energy left, λ‖PF‖² ≤ rank F + μ‖UUᵀR‖². Its normal equations hold.
- hard: P = I − UUᵀ is an orthogonal projector; it removes at least `energy` of the energy of F's part outside
  the dominant retain subspace, leaves that subspace in place, and changes R by no more than R's energy outside it.

The checks are inequalities with float64 rounding room, never bitwise equalities, so they hold on any CPU.
"""

from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clipforget.method.nullspace import _energy_rank, _weighted, hard_projection, soft_projection

EXAMPLES = os.environ.get("CLIPFORGET_HYPOTHESIS_EXAMPLES")  # more, and random, for a deeper search by hand
SETTINGS = settings(max_examples=int(EXAMPLES or 60), derandomize=EXAMPLES is None, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


@st.composite
def sets(draw):
    """F [d, nf] and R [d, nr]: random low-rank structure, scales from 1e-3 to 1e3, F partly inside R's span."""
    d = draw(st.integers(2, 24))
    nf, nr = draw(st.integers(1, 10)), draw(st.integers(0, 40))
    rank_f, rank_r = draw(st.integers(1, d)), draw(st.integers(1, d))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    f_scale, r_scale = (10.0 ** draw(st.integers(-3, 3)) for _ in range(2))
    overlap = draw(st.sampled_from([0.0, 0.3, 1.0]))
    R = torch.randn(d, rank_r, generator=g, dtype=torch.float64) @ torch.randn(rank_r, nr, generator=g,
                                                                                dtype=torch.float64) * r_scale
    F = torch.randn(d, rank_f, generator=g, dtype=torch.float64) @ torch.randn(rank_f, nf, generator=g,
                                                                                dtype=torch.float64) * f_scale
    if nr and overlap:
        F = F + overlap * R[:, :1] @ torch.randn(1, nf, generator=g, dtype=torch.float64)
    if draw(st.booleans()):  # embeddings arrive normalized, as the pipeline builds them
        F = F / F.norm(dim=0, keepdim=True).clamp_min(1e-12)
        R = R / R.norm(dim=0, keepdim=True).clamp_min(1e-12) if nr else R
    return F, R


def sq(M: torch.Tensor) -> float:
    return float((M**2).sum())


@SETTINGS
@given(sets(), st.sampled_from([1.0, 10.0, 100.0, 1000.0]), st.sampled_from([0.1, 1.0, 10.0, 100.0]))
def test_soft_projection_keeps_the_ridge_promise(FR, lam, mu):
    """60 random (F, R, λ, μ): P finite; normal equations hold; J(P) ≤ J(I) and ≤ J(I − UUᵀ), which bounds the
    retain change μ‖PR − R‖² ≤ λ‖F‖² and the forget energy left λ‖PF‖² ≤ rank F + μ‖UUᵀR‖²."""
    F, R = FR
    P = soft_projection(F, R, lam=lam, mu=mu).P
    d = F.shape[0]
    eye = torch.eye(d, dtype=torch.float64)
    assert P.shape == (d, d) and bool(torch.isfinite(P).all())

    def J(M: torch.Tensor) -> float:
        return sq(M - eye) + lam * sq(M @ F) + mu * sq(M @ R - R)

    tol = 1e-7 * (1 + J(eye))
    # normal equations: P (I + λFFᵀ + μRRᵀ) = I + μRRᵀ
    A, B = eye + lam * F @ F.T + mu * R @ R.T, eye + mu * R @ R.T
    assert sq(P @ A - B) ** 0.5 <= 1e-8 * (1 + sq(A) ** 0.5) * (1 + sq(P) ** 0.5)
    # optimal against the identity: the retain set moves by at most what keeping F would cost
    assert J(P) <= J(eye) + tol
    assert mu * sq(P @ R - R) <= lam * sq(F) + tol
    # optimal against the projector that removes F's span: the forget energy left is bounded
    U, s, _ = torch.linalg.svd(F, full_matrices=False)
    U = U[:, s > s[0] * 1e-10] if s[0] > 0 else U[:, :0]
    Q = eye - U @ U.T
    assert J(P) <= J(Q) + tol
    assert lam * sq(P @ F) <= U.shape[1] + mu * sq(U @ (U.T @ R)) + tol


@SETTINGS
@given(sets(), st.sampled_from([0.5, 0.9, 0.95, 0.99]), st.sampled_from([0.0, 0.5, 0.9, 0.99]))
def test_hard_projection_removes_forget_energy_and_keeps_the_retain_subspace(FR, energy, retain_energy):
    """60 random (F, R, energy, retain energy): P a finite orthogonal projector of rank d − k; the dominant retain
    subspace fixed; ‖PR − R‖² ≤ R's energy outside it; ≥ `energy` of F's outside part removed."""
    F, R = FR
    proj = hard_projection(F, R, energy=energy, retain_energy=retain_energy)
    P = proj.P
    d = F.shape[0]
    assert P.shape == (d, d) and bool(torch.isfinite(P).all())
    # an orthogonal projector: symmetric and idempotent, of rank d - k
    assert torch.allclose(P, P.T, atol=1e-10) and torch.allclose(P @ P, P, atol=1e-9)
    assert abs(float(torch.trace(P)) - (d - proj.rank_removed)) < 1e-8
    # the dominant retain subspace the solver protects, and F's part outside it
    Fw, Rw = _weighted(F, None), _weighted(R, None)
    if Rw.shape[1] and retain_energy > 0:
        Ur, sr, _ = torch.linalg.svd(Rw, full_matrices=False)
        Ur = Ur[:, : _energy_rank(sr, retain_energy)]
    else:
        Ur = torch.zeros(d, 0, dtype=torch.float64)
    Fp = Fw - Ur @ (Ur.T @ Fw)
    # F inside the protected subspace (its outside part is rounding noise): nothing is removed
    if sq(Fp) ** 0.5 <= 1e-9 * float(torch.linalg.matrix_norm(Fw, ord=2)):
        assert proj.rank_removed == 0 and torch.equal(P, torch.eye(d, dtype=torch.float64))
    # rounding: Fp is orthogonal to that subspace up to eps·‖F‖, so U is, up to eps·‖F‖/‖Fp‖
    eps = torch.finfo(torch.float64).eps
    amp = 1e3 * eps * sq(F) ** 0.5 / max(sq(Fp) ** 0.5, 1e-300) if proj.rank_removed else 0.0
    # that subspace stays where it is, so R changes by at most its energy outside it
    assert sq(P @ Ur - Ur) ** 0.5 <= amp * max(Ur.shape[1], 1) ** 0.5 + 1e-12
    assert sq(P @ R - R) ** 0.5 <= sq(R - Ur @ (Ur.T @ R)) ** 0.5 * (1 + 1e-9) + amp * sq(R) ** 0.5 + 1e-12
    # at least `energy` of the outside part of F is gone (directions below 1e-6 of the top one are noise)
    assert sq(P @ Fp) <= (1 - energy) * sq(Fp) + 1e-10 * sq(Fp) + 1e-24
