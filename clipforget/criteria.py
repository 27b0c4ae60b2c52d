"""Success criteria of a forget request per mode, measured from per-cell accuracy before and after.

The numbers are the project's acceptance targets on the toy world (issue 2); each check reports the
measured value next to its limit so a miss says by how much.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from clipforget.evaluate import EvalReport
from clipforget.grid import Cell


@dataclass(frozen=True)
class Check:
    name: str
    value: float
    limit: float

    @property
    def passed(self) -> bool:
        return bool(self.value <= self.limit + 1e-12)

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


# the highest accuracy a single forget cell may keep, per mode
FORGET_CELL_LIMIT = {"global": 0.15, "domain": 0.15, "domain_complete": 0.50}


def _drop(before: EvalReport, after: EvalReport, cells: Sequence[Cell]) -> float:
    return before.mean_over(cells) - after.mean_over(cells)


def mode_checks(mode: str, before: EvalReport, after: EvalReport, forget: Sequence[Cell]) -> list[Check]:
    """The mode's checks; a check over an empty set of cells (e.g. no kept domain of a class that a cumulative
    ledger also forgets everywhere) is left out rather than failed or passed."""
    fb, fa = before.by_cell(), after.by_cell()
    gone = set(forget)
    measured = [c for c in fb if c in fa]
    forget_m = [c for c in measured if c in gone]
    retain_m = [c for c in measured if c not in gone]
    if not forget_m:
        raise ValueError("none of the forget cells was measured")
    drops = {c: fb[c].accuracy - fa[c].accuracy for c in retain_m}
    max_forget = max(fa[c].accuracy for c in forget_m)
    if mode == "global":
        checks = [Check("max forget-cell accuracy", max_forget, FORGET_CELL_LIMIT[mode])]
        if retain_m:
            checks += [Check("mean retain drop", _drop(before, after, retain_m), 0.03),
                       Check("max retain-cell drop", max(drops.values()), 0.10)]
        return checks
    if mode == "domain":
        classes = {c.cls for c in forget}
        same = [c for c in retain_m if c.cls in classes]
        other = [c for c in retain_m if c.cls not in classes]
        checks = [Check("max forget-cell accuracy", max_forget, FORGET_CELL_LIMIT[mode])]
        if same:
            checks.append(Check("max drop, same class in kept domains", max(drops[c] for c in same), 0.05))
        if other:
            checks.append(Check("mean drop, other cells", _drop(before, after, other), 0.03))
        return checks
    if mode == "domain_complete":
        kept_domains = sorted({c.domain for c in retain_m})
        per_domain = [_drop(before, after, [c for c in retain_m if c.domain == d]) for d in kept_domains]
        checks = [Check("mean forget accuracy", after.mean_over(forget_m), 0.25),
                  Check("max forget-cell accuracy", max_forget, FORGET_CELL_LIMIT[mode])]
        if per_domain:
            checks.append(Check("max mean drop of a kept domain", float(np.max(per_domain)), 0.05))
        return checks
    raise ValueError(f"unknown mode {mode!r}")
