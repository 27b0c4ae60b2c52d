"""The projections do what docs/DESIGN.md says: soft is the ridge minimizer, hard removes forget directions
outside the retain subspace and leaves that subspace exactly in place."""

import pytest
import torch

from clipforget.method.nullspace import hard_projection, soft_projection


def _orthonormal(d: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))
    return q


@pytest.fixture
def sets():
    d = 64
    basis = _orthonormal(d, 20, 0)
    retain_space, forget_space = basis[:, :12], basis[:, 12:]
    g = torch.Generator().manual_seed(1)
    R = retain_space @ torch.randn(12, 60, generator=g, dtype=torch.float64)
    # forget columns: mostly new directions, partly shared with the retain subspace
    F = forget_space @ torch.randn(8, 10, generator=g, dtype=torch.float64) + 0.3 * retain_space @ torch.randn(
        12, 10, generator=g, dtype=torch.float64)
    return F, R, retain_space, forget_space


def objective(P, F, R, lam, mu, fw=None, rw=None):
    fw = torch.ones(F.shape[1], dtype=F.dtype) if fw is None else fw
    rw = torch.ones(R.shape[1], dtype=R.dtype) if rw is None else rw
    eye = torch.eye(P.shape[0], dtype=P.dtype)
    return ((P - eye) ** 2).sum() + lam * (((P @ F) ** 2) * fw).sum() + mu * (((P @ R - R) ** 2) * rw).sum()


def test_soft_projection_is_the_ridge_minimizer(sets):
    F, R, *_ = sets
    proj = soft_projection(F, R, lam=50.0, mu=5.0)
    best = objective(proj.P, F, R, 50.0, 5.0)
    g = torch.Generator().manual_seed(2)
    for _ in range(5):  # any perturbation costs more
        E = torch.randn(proj.P.shape, generator=g, dtype=torch.float64) * 1e-3
        assert objective(proj.P + E, F, R, 50.0, 5.0) > best
    assert proj.condition is not None and proj.condition >= 1.0


def test_soft_projection_removes_forget_and_keeps_retain(sets):
    _, R, _, forget_space = sets
    F = forget_space @ torch.randn(8, 10, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    P = soft_projection(F, R, lam=1e4, mu=1e2).P
    # forget directions that the retain set does not need are removed; the retain set stays
    assert (P @ F).norm() / F.norm() < 0.01
    assert (P @ R - R).norm() / R.norm() < 0.01


def test_soft_retain_weights_protect_their_columns(sets):
    F, R, *_ = sets
    w = torch.ones(R.shape[1], dtype=torch.float64)
    w[:10] = 50.0
    plain = soft_projection(F, R, lam=1e3, mu=1.0).P
    weighted = soft_projection(F, R, lam=1e3, mu=1.0, retain_weights=w).P
    err = lambda P: (P @ R[:, :10] - R[:, :10]).norm()  # noqa: E731
    assert err(weighted) < 0.5 * err(plain)


def test_hard_projection_is_orthogonal_and_exact(sets):
    F, R, retain_space, forget_space = sets
    proj = hard_projection(F, R, energy=1.0, retain_energy=1.0)
    P = proj.P
    assert torch.allclose(P, P.T, atol=1e-12)
    assert torch.allclose(P @ P, P, atol=1e-10)
    assert proj.rank_removed == 8
    # the retain subspace is untouched, the new forget directions are gone
    assert torch.allclose(P @ R, R, atol=1e-9)
    assert (P @ forget_space).norm() < 1e-9
    F_perp = F - retain_space @ (retain_space.T @ F)
    assert (P @ F_perp).norm() < 1e-9


def test_hard_energy_cut_limits_rank(sets):
    F, R, *_ = sets
    full = hard_projection(F, R, energy=1.0, retain_energy=1.0).rank_removed
    cut = hard_projection(F, R, energy=0.5, retain_energy=1.0).rank_removed
    capped = hard_projection(F, R, energy=1.0, retain_energy=1.0, max_rank=2).rank_removed
    assert cut < full and capped == 2


def test_apply_matches_matrix_product(sets):
    F, R, *_ = sets
    proj = hard_projection(F, R)
    h = torch.randn(7, F.shape[0])
    assert torch.allclose(proj(h), (proj.P.float() @ h.T).T, atol=1e-5)


@pytest.mark.parametrize("bad", ["shape", "empty", "nan", "weights"])
def test_bad_input_is_rejected(sets, bad):
    F, R, *_ = sets
    kwargs = {}
    if bad == "shape":
        F = F[:10]
    elif bad == "empty":
        F = F[:, :0]
    elif bad == "nan":
        F = F.clone()
        F[0, 0] = float("nan")
    else:
        kwargs["forget_weights"] = -torch.ones(F.shape[1])
    for build in (soft_projection, hard_projection):
        with pytest.raises(ValueError):
            build(F, R, **kwargs)
