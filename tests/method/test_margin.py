"""The margin-aware map (clipforget.method.margin): forget samples lose their class, retain samples keep it, and with
`retain_radius` the flagged retain samples keep their margin in a ball around them, not only at the point."""

import pytest
import torch
import torch.nn.functional as F

from clipforget.method.margin import _margins, _robust_margins, _robust_margins_all, margin_projection


def _toy(seed: int = 0):
    """Two classes along e0/e1, two 'domains' along e2/e3: forget class 0 in domain A, keep it in domain B."""
    g = torch.Generator().manual_seed(seed)
    d = 8
    eye = torch.eye(d, dtype=torch.float64)
    classifier = F.normalize(eye[:2] + 0.1 * torch.randn(2, d, generator=g, dtype=torch.float64), dim=-1)

    def cell(cls: int, dom: int, n: int = 12) -> torch.Tensor:
        return F.normalize(eye[cls] + 0.6 * eye[2 + dom] + 0.05 * torch.randn(n, d, generator=g, dtype=torch.float64),
                           dim=-1)

    forget = cell(0, 0)
    retain = torch.cat([cell(0, 1), cell(1, 0), cell(1, 1)])
    rl = torch.tensor([0] * 12 + [1] * 24)
    return forget, torch.zeros(12, dtype=torch.long), retain, rl, classifier


def test_robust_margin_gradient_matches_autograd():
    forget, _, retain, rl, classifier = _toy()
    P = torch.eye(8, dtype=torch.float64) + 0.1 * torch.randn(8, 8, generator=torch.Generator().manual_seed(2),
                                                               dtype=torch.float64)
    m, gnorm = _robust_margins(retain, classifier, rl, P)
    h = retain.clone().requires_grad_()
    auto = _margins(h @ P.T, classifier, rl)
    (grad,) = torch.autograd.grad(auto.sum(), h)
    assert torch.allclose(m, auto.detach())
    assert torch.allclose(gnorm, grad.norm(dim=-1), atol=1e-10)


def test_margin_map_forgets_one_cell_and_keeps_the_rest():
    forget, fl, retain, rl, classifier = _toy()
    proj = margin_projection(forget, fl, retain, rl, classifier, margin=0.2, weight=100.0, steps=200)
    assert (_margins(forget @ proj.P.T, classifier, fl) < 0).all()
    assert (_margins(retain @ proj.P.T, classifier, rl) > 0).all()


def test_retain_radius_widens_the_kept_margin_of_the_rows_given_one():
    forget, fl, retain, rl, classifier = _toy()
    same = torch.tensor([True] * 12 + [False] * 24)  # class 0 in the kept domain
    kw = dict(margin=0.3, weight=100.0, steps=200, retain_margin=1.0)
    plain = margin_projection(forget, fl, retain, rl, classifier, **kw)
    robust = margin_projection(forget, fl, retain, rl, classifier, retain_radius=0.1 * same.double(), **kw)
    assert robust.params["retain_radius"] == 0.1

    def worst(P: torch.Tensor) -> float:  # first-order worst-case margin within 0.1 of the flagged rows
        m, g = _robust_margins(retain[same], classifier, rl[same], P)
        return float((m - 0.1 * g).min())

    assert worst(robust.P) > worst(plain.P)
    assert (_margins(forget @ robust.P.T, classifier, fl) < 0).all()


def test_robust_margin_against_every_class_matches_autograd_per_class():
    g = torch.Generator().manual_seed(3)  # four classes: the worst class under a move is not always the best other
    retain = F.normalize(torch.randn(40, 8, generator=g, dtype=torch.float64), dim=-1)
    rl = torch.randint(0, 4, (40,), generator=g)
    classifier = F.normalize(torch.randn(4, 8, generator=g, dtype=torch.float64), dim=-1)
    P = torch.eye(8, dtype=torch.float64) + 0.1 * torch.randn(8, 8, generator=g, dtype=torch.float64)
    assert torch.allclose(_robust_margins_all(retain, classifier, rl, P, torch.zeros(len(retain), dtype=torch.float64)),
                          _margins(retain @ P.T, classifier, rl))
    eps = 0.1
    h = retain.clone().requires_grad_()
    s = F.normalize(h @ P.T, dim=-1) @ classifier.T
    per_class = []
    for c in range(classifier.shape[0]):  # s_y − s_c − ε‖∇ₕ(s_y − s_c)‖, by autograd
        diff = s.gather(1, rl[:, None]).squeeze(1) - s[:, c]
        (grad,) = torch.autograd.grad(diff.sum(), h, retain_graph=True)
        per_class.append(torch.where(rl == c, torch.inf, diff.detach() - eps * grad.norm(dim=-1)))
    expected = torch.stack(per_class, 1).min(1).values
    assert torch.allclose(_robust_margins_all(retain, classifier, rl, P, torch.full((len(retain),), eps,
                                                                                    dtype=torch.float64)), expected)



def test_robust_margins_in_an_ellipsoid_match_autograd():
    """With a metric S the move is S u, ‖u‖ ≤ ε: the margin drops by ε‖Sᵀ∇ₕ‖, against every class and against the best
    other class alike; S = I is the ball."""
    g = torch.Generator().manual_seed(5)
    retain = F.normalize(torch.randn(30, 8, generator=g, dtype=torch.float64), dim=-1)
    rl = torch.randint(0, 3, (30,), generator=g)
    classifier = F.normalize(torch.randn(3, 8, generator=g, dtype=torch.float64), dim=-1)
    P = torch.eye(8, dtype=torch.float64) + 0.1 * torch.randn(8, 8, generator=g, dtype=torch.float64)
    A = torch.randn(8, 8, generator=g, dtype=torch.float64)
    S = A @ A.T / 8 + 0.1 * torch.eye(8, dtype=torch.float64)  # symmetric, positive definite
    eps = torch.full((30,), 0.1, dtype=torch.float64)
    h = retain.clone().requires_grad_()
    s = F.normalize(h @ P.T, dim=-1) @ classifier.T
    per_class = []
    for c in range(3):
        diff = s.gather(1, rl[:, None]).squeeze(1) - s[:, c]
        (grad,) = torch.autograd.grad(diff.sum(), h, retain_graph=True)
        per_class.append(torch.where(rl == c, torch.inf, diff.detach() - 0.1 * (grad @ S).norm(dim=-1)))
    assert torch.allclose(_robust_margins_all(retain, classifier, rl, P, eps, S), torch.stack(per_class, 1).min(1).values)
    assert torch.allclose(_robust_margins_all(retain, classifier, rl, P, eps, torch.eye(8, dtype=torch.float64)),
                          _robust_margins_all(retain, classifier, rl, P, eps))
    m, gnorm = _robust_margins(retain, classifier, rl, P, S)
    auto = _margins(h @ P.T, classifier, rl)
    (grad,) = torch.autograd.grad(auto.sum(), h)
    assert torch.allclose(gnorm, (grad @ S).norm(dim=-1), atol=1e-10)


def test_spread_metric_is_the_ball_at_zero_and_the_prototypes_spread_at_one():
    from clipforget.method.grid import Cell
    from clipforget.method.projection import spread_metric
    from clipforget.method.synthesis import Prototypes, SynthesisConfig

    g = torch.Generator().manual_seed(6)
    cells = [Cell("a", "x"), Cell("b", "x")]
    # every cell's prototypes spread along e0 only
    emb = torch.zeros(8, 4, dtype=torch.float64)
    emb[:, 1] = 1.0
    emb[:4, 2] = 1.0
    emb[:, 0] = 0.1 * torch.randn(8, generator=g, dtype=torch.float64)
    protos = Prototypes(emb.float(), [cells[0]] * 4 + [cells[1]] * 4, torch.ones(8), torch.ones(8), 0.0,
                        SynthesisConfig())
    assert torch.allclose(spread_metric(cells, protos, 0.0), torch.eye(4, dtype=torch.float64))
    S = spread_metric(cells, protos, 1.0)
    assert torch.allclose(S, S.T)
    assert float((S @ S).trace()) == pytest.approx(4.0)  # the ball's mean size
    assert float(S[0, 0]) > 1.5 and float(S[3, 3]) == pytest.approx(0.0, abs=1e-6)  # long along e0, flat along e3
    with pytest.raises(ValueError, match="radius_spread"):
        spread_metric(cells, protos, 1.5)


def test_spread_copies_hold_the_retain_margin_farther_out():
    """`spread_copies` k fits on each cell's prototypes and on a copy of them k times as far from the cell's mean: the
    kept cells then keep their class over that wider spread, not only at the prototypes."""
    from dataclasses import replace

    from clipforget.method.grid import Cell
    from clipforget.method.projection import NullspaceConfig, fit_projection
    from clipforget.method.synthesis import Prototypes, SynthesisConfig

    forget, _, retain, rl, classifier = _toy()
    cells = [Cell("c0", "A"), Cell("c0", "B"), Cell("c1", "A"), Cell("c1", "B")]
    emb = torch.cat([forget, retain]).float()
    owners = [c for c in cells for _ in range(12)]
    protos = Prototypes(emb, owners, torch.ones(48), torch.ones(48), 0.0, SynthesisConfig())
    cfg = NullspaceConfig(kind="margin", margin=0.3, margin_weight=100.0, margin_steps=200, retain_margin=1.0)
    text = {c: torch.zeros(8) for c in cells}
    plain = fit_projection(cells[:1], cells[1:], text, protos, cfg, (["c0", "c1"], classifier))
    wide = fit_projection(cells[:1], cells[1:], text, protos, replace(cfg, spread_copies=3.0), (["c0", "c1"], classifier))

    def worst_far(P: torch.Tensor) -> float:  # the kept cells' prototypes three times as far from their means
        far = torch.cat([F.normalize(m + 3 * (x - m), dim=-1) for x in retain.split(12) for m in [x.mean(0)]])
        return float(_margins(far @ P.T.double(), classifier, rl).min())

    assert worst_far(wide.P) > worst_far(plain.P)
    assert (_margins(forget @ wide.P.T.double(), classifier, torch.zeros(12, dtype=torch.long)) < 0).all()


def test_boundary_copies_are_the_other_classes_of_the_forgotten_domain_moved_toward_the_forgotten_cell():
    """`boundary_mix` a adds, for each cell of another class in a forgotten cell's domain, its prototypes moved a of the
    way toward the forgotten cell's, labelled with their own class; the forgotten class's kept cells and the cells of
    other domains get none."""
    from clipforget.method.grid import Cell
    from clipforget.method.projection import _with_boundary_copies
    from clipforget.method.synthesis import Prototypes, SynthesisConfig

    forget, _, retain, rl, _ = _toy()
    cells = [Cell("c0", "A"), Cell("c0", "B"), Cell("c1", "A"), Cell("c1", "B")]
    protos = Prototypes(torch.cat([forget, retain]).float(), [c for c in cells for _ in range(12)], torch.ones(48),
                        torch.ones(48), 0.0, SynthesisConfig())
    owners = [c for c in cells[1:] for _ in range(12)]
    r, labels, out_owners = _with_boundary_copies(cells[:1], cells[1:], protos, 0.3, {"c0": 0, "c1": 1},
                                                  retain.float(), rl, owners)
    assert len(r) == 36 + 12 and out_owners[36:] == [Cell("c1", "A")] * 12
    assert torch.equal(labels[36:], torch.ones(12, dtype=torch.long)) and torch.equal(labels[:36], rl)
    expected = F.normalize(0.7 * retain[12:24].float() + 0.3 * forget.float(), dim=-1)
    assert torch.allclose(r[36:], expected, atol=1e-6)


def test_conformal_weight_keeps_the_map_closer_to_a_scaled_rotation():
    forget, fl, retain, rl, classifier = _toy()
    kw = dict(margin=0.3, weight=100.0, steps=200, retain_margin=1.0)

    def off_conformal(P: torch.Tensor) -> float:
        gram = P.T @ P
        return float((gram - gram.diagonal().mean() * torch.eye(8, dtype=gram.dtype)).norm())

    plain = margin_projection(forget, fl, retain, rl, classifier, **kw)
    held = margin_projection(forget, fl, retain, rl, classifier, conformal=30.0, **kw)
    assert off_conformal(held.P) < 0.5 * off_conformal(plain.P)


def test_retain_radii_by_class_and_domain():
    from clipforget.method.grid import Cell
    from clipforget.method.projection import NullspaceConfig, retain_radii

    forget = [Cell("star", "sketch")]
    owners = [Cell("star", "photo"), Cell("heart", "sketch"), Cell("heart", "photo")]
    cfg = NullspaceConfig(kind="margin", same_class_radius=0.05, other_class_radius=0.1)
    assert retain_radii(forget, owners, cfg).tolist() == [0.05, 0.1, 0.1]
    cfg = NullspaceConfig(kind="margin", same_class_radius=0.05, other_class_radius=0.1, same_domain_radius=0.2)
    assert retain_radii(forget, owners, cfg).tolist() == [0.05, 0.2, 0.1]
