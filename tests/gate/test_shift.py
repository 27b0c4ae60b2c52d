"""The held-out evidence shifted along its own spread (clipforget.gate.shift) and the gate's check on it."""

from __future__ import annotations

import torch

from clipforget.gate.criteria import RETAIN_CELL_LIMIT
from clipforget.gate.shift import SHIFT_CHECK, shift_cells, shift_check, shifted_evidence
from clipforget.gate.verdict import ForgetGroup, Thresholds, gate_checks
from clipforget.method.evaluate import score_cells
from clipforget.method.grid import Cell

CLASSES = ["circle", "cross", "star"]
ROWS = torch.eye(4)[:3]  # class c wins where feature c is largest (4th feature: no class)


def accuracy(features: torch.Tensor, cell: Cell) -> float:
    return float((features @ ROWS.T).argmax(-1).eq(CLASSES.index(cell.cls)).float().mean())


def cell_features(cls: str, n: int = 20, spread: float = 0.1, seed: int = 0) -> torch.Tensor:
    """n features on the class's axis, half `spread` above and half below it along the 4th (class-free) axis."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 4)
    x[:, CLASSES.index(cls)] = 1.0
    x[:, 3] = spread * torch.tensor([1.0, -1.0]).repeat(n // 2)
    return x + 0.005 * torch.randn(n, 4, generator=g)


def steep_toward_star(slope: float = 8.0) -> torch.Tensor:
    """A map that adds `slope` × the 4th feature to `star`'s: no cell of another class on its axis flips, one
    shifted 0.1 along the 4th axis does."""
    m = torch.eye(4)
    m[2, 3] = slope
    return m


def test_a_map_steep_along_a_cells_spread_is_caught_where_the_unshifted_evidence_shows_nothing():
    cross = Cell("cross", "sketch")
    base = cell_features("cross")
    after = base @ steep_toward_star().T  # the 4th axis, along which the cell spreads, now pushes toward `star`
    assert accuracy(base, cross) == 1.0 and accuracy(after, cross) == 1.0  # the evidence as it is shows nothing
    (worst,) = shifted_evidence(base, after, [cross] * len(base), accuracy).values()
    assert worst.before == 1.0 and worst.after <= 0.5 and worst.drop >= 0.5
    assert abs(worst.direction) == 1  # along the cell's first direction (either sign: an SVD's)
    (same,) = shifted_evidence(base, base.clone(), [cross] * len(base), accuracy).values()
    assert same.drop == 0.0


def test_the_shifted_features_after_the_map_are_the_map_of_the_shifted_features():
    """Only the two feature sets are given: the shift's image under the map comes from them (the map is linear)."""
    g = torch.Generator().manual_seed(1)
    P = torch.eye(4) + 0.3 * torch.randn(4, 4, generator=g)
    cell = Cell("star", "photo")
    base = cell_features("star", spread=0.3)
    seen: list[torch.Tensor] = []

    def record(features: torch.Tensor, c: Cell) -> float:
        seen.append(features.clone())
        return accuracy(features, c)

    shifted_evidence(base, base @ P.T, [cell] * len(base), record, directions=3)
    assert len(seen) == 2 * 3 * 2  # 3 directions, both signs, before and after
    for shifted_base, shifted_after in zip(seen[0::2], seen[1::2], strict=True):
        assert not torch.allclose(shifted_base, base)
        assert torch.allclose(shifted_after, shifted_base @ P.T, atol=1e-5)


def test_the_check_holds_the_other_classes_of_a_forgotten_domain_and_only_those():
    domain = ForgetGroup("domain", (Cell("star", "sketch"),))
    glob = ForgetGroup("global", tuple(Cell("circle", d) for d in ("photo", "sketch")))
    measured = [Cell(c, d) for c in CLASSES for d in ("photo", "sketch")]
    assert shift_cells([domain], measured) == [Cell("circle", "sketch"), Cell("cross", "sketch")]
    assert shift_cells([glob], measured) == []
    assert shift_cells([domain, glob], measured) == [Cell("cross", "sketch")]  # circle/sketch is forgotten too

    cells = [c for c in measured for _ in range(10)]
    base = torch.cat([cell_features(c.cls, n=10, seed=i) for i, c in enumerate(measured)])
    shifted = shifted_evidence(base, base @ steep_toward_star().T, cells, accuracy)
    check = shift_check([domain], shifted)
    assert check is not None and check.name == SHIFT_CHECK and check.limit == RETAIN_CELL_LIMIT
    assert not check.passed and check.cell in ("circle/sketch", "cross/sketch") and check.n == 10
    assert shift_check([glob], shifted) is None
    calm = shift_check([domain], shifted_evidence(base, base.clone(), cells, accuracy))
    assert calm is not None and calm.passed and calm.value == 0.0


def test_the_gate_adds_the_check_for_data_free_verdicts_with_the_mode_criteria_only():
    group = ForgetGroup("domain", (Cell("star", "sketch"),))
    measured = [Cell(c, d) for c in CLASSES for d in ("photo", "sketch")]
    cells = [c for c in measured for _ in range(20)]
    base = torch.cat([cell_features(c.cls, seed=i) for i, c in enumerate(measured)])
    after = base.clone()
    after[[i for i, c in enumerate(cells) if c == Cell("star", "sketch")], 2] = -1.0  # the forgotten cell forgotten
    shifted = shifted_evidence(base, after @ steep_toward_star().T, cells, accuracy)

    def report(features: torch.Tensor):
        return score_cells([CLASSES[i] for i in (features @ ROWS.T).argmax(-1).tolist()], cells)

    before_r, after_r = report(base), report(after)
    plain = gate_checks([group], before_r, after_r, Thresholds())
    assert all(c.passed for c in plain) and SHIFT_CHECK not in [c.name for c in plain]
    held = gate_checks([group], before_r, after_r, Thresholds(), shifted=shifted)
    assert [c.name for c in held if not c.passed] == [SHIFT_CHECK]
    own = gate_checks([group], before_r, after_r, Thresholds(mode_criteria=False, max_forget_acc=0.15), shifted=shifted)
    assert SHIFT_CHECK not in [c.name for c in own]


def test_shifted_evidence_of_the_cells_asked_for_only():
    """The pipeline asks for the cells the check holds (`shift_cells`), not every cell of the grid."""
    measured = [Cell(c, "sketch") for c in CLASSES]
    cells = [c for c in measured for _ in range(10)]
    base = torch.cat([cell_features(c.cls, n=10, seed=i) for i, c in enumerate(measured)])
    every = shifted_evidence(base, base @ steep_toward_star().T, cells, accuracy)
    asked = shifted_evidence(base, base @ steep_toward_star().T, cells, accuracy, of={Cell("cross", "sketch")})
    assert set(every) == set(measured) and list(asked) == [Cell("cross", "sketch")]
    assert asked[Cell("cross", "sketch")] == every[Cell("cross", "sketch")]
