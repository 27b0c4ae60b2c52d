"""Data-free evidence shifted along its own spread: does a verdict on held-out prototypes hold a little way off?

Held-out prototypes of a cell sit close together and somewhat apart from the cell's images; on the toy benchmark
79% of the images' offset from the prototypes' mean lies in the ten main directions of the prototypes' own spread
(docs/GATE.md, "Where the gap sits"). A map that forgets a class in one domain can be steep there, so a kept cell
of that domain whose prototypes keep their class can lose it on images a short way off: most of the false approvals
of `domain` requests measured by bench/requests.py were such cells.

For each kept cell this shifts all of the cell's held-out features together by `SHIFT_SCALE` standard deviations of
the cell's own spread along each of its `SHIFT_DIRECTIONS` main directions, both signs (whole-cell shifts: the
images' mean moves, not each image), and classifies the shifted features before and after the map. The unlearned
model's features are a linear map of the base model's (the projection is folded into the image tower's last linear
layer), so the shifted features after the map follow from the two feature sets alone: no projection file needed.

The gate holds the other classes of a `domain` request's forgotten domains to the retain-cell limit under the worst
shift (`shift_check`); it applies to verdicts on held-out prototypes only (on images the images decide).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch

from clipforget.gate.criteria import RETAIN_CELL_LIMIT, Check
from clipforget.method.grid import Cell

SHIFT_DIRECTIONS = 6  # main directions of a cell's spread, each shifted along both ways
SHIFT_SCALE = 1.5  # the shift, in standard deviations of the cell's held-out features along the direction
SHIFT_CHECK = "max drop, other cells of a forgotten domain, evidence shifted along its spread"


@dataclass(frozen=True)
class ShiftedCell:
    """The shift of one cell's held-out features that cost most: accuracy before and after the map, over n."""

    cell: str
    n: int
    before: float
    after: float
    direction: int  # 1-based rank of the direction, negative for the minus sign

    @property
    def drop(self) -> float:
        return self.before - self.after

    def to_dict(self) -> dict:
        return {**asdict(self), "drop": self.drop}


def shifted_evidence(base: torch.Tensor, after: torch.Tensor, cells: Sequence[Cell],
                     accuracy: Callable[[torch.Tensor, Cell], float], *, directions: int = SHIFT_DIRECTIONS,
                     scale: float = SHIFT_SCALE, of: Collection[Cell] | None = None) -> dict[Cell, ShiftedCell]:
    """Per cell with at least 3 rows (of the cells `of`, default every cell), the whole-cell shift (`scale` standard
    deviations along one of the cell's `directions` main directions, either sign) whose accuracy drops most from
    `base` to `after`.

    `base`, `after`: features [N, d] of the same images by the base and the unlearned model, `after` a linear map of
    `base`; `accuracy(features, cell)`: the share of rows classified as `cell`'s class."""
    out: dict[Cell, ShiftedCell] = {}
    for cell in dict.fromkeys(cells):
        if of is not None and cell not in of:
            continue
        rows = [i for i, c in enumerate(cells) if c == cell]
        if len(rows) < 3:
            continue
        xb, xa = base[rows].double(), after[rows].double()
        cb, ca = xb - xb.mean(0), xa - xa.mean(0)
        u, s, vh = torch.linalg.svd(cb, full_matrices=False)
        k = min(directions, int((s > s[0] * 1e-6).sum()))
        sd = s[:k] / (len(rows) - 1) ** 0.5
        # v_i = cbᵀ u_i / s_i, and ca = cb Pᵀ, so the map sends v_i to caᵀ u_i / s_i
        moved = (ca.T @ u[:, :k] / s[:k]).T
        worst: ShiftedCell | None = None
        for i in range(k):
            for sign in (1, -1):
                b = accuracy((xb + sign * scale * sd[i] * vh[i]).float(), cell)
                a = accuracy((xa + sign * scale * sd[i] * moved[i]).float(), cell)
                if worst is None or b - a > worst.drop:
                    worst = ShiftedCell(str(cell), len(rows), b, a, sign * (i + 1))
        if worst is not None:
            out[cell] = worst
    return out


def shift_cells(groups: Sequence, measured: Sequence[Cell]) -> list[Cell]:
    """The cells `shift_check` holds: for each `domain` group, the measured cells (each once; `measured` may name
    a cell per image) of its forgotten domains whose class it does not forget, less every cell some group forgets."""
    forgotten = {c for g in groups for c in g.cells}
    out: list[Cell] = []
    for g in groups:
        if g.mode != "domain":
            continue
        domains, classes = {c.domain for c in g.cells}, {c.cls for c in g.cells}
        out += [c for c in measured if c.domain in domains and c.cls not in classes and c not in forgotten
                and c not in out]
    return out


def shift_check(groups: Sequence, shifted: Mapping[Cell, ShiftedCell],
                scale: float = SHIFT_SCALE, directions: int = SHIFT_DIRECTIONS) -> Check | None:
    """The other classes of each `domain` group's forgotten domains (`shift_cells`), each under its worst shift,
    held to the retain-cell limit; None when there is no such cell."""
    cells = [c for c in shift_cells(groups, list(shifted)) if c in shifted]
    if not cells:
        return None
    worst = max(cells, key=lambda c: shifted[c].drop)
    w = shifted[worst]
    return Check(SHIFT_CHECK, w.drop, RETAIN_CELL_LIMIT, n=w.n, estimate=w.drop,
                 rule=f"held-out prototypes of each cell shifted together by {scale:g} sd along each of their "
                      f"{directions} main directions, both signs; the worst shift ({'+' if w.direction > 0 else '-'}"
                      f"direction {abs(w.direction)}: {w.before:.2f} -> {w.after:.2f})",
                 cell=w.cell)
