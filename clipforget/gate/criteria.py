"""Success criteria of a forget request per mode, decided on evidence (docs/GATE.md).

The limits are the project's acceptance targets on the toy world. Every check states the rule it was
decided by, the number of images behind it and its interval:

- forget checks use the one-sided 95% Clopper–Pearson upper bound of the cell's accuracy: an approval
  claims, with 95% confidence, that the cell's accuracy is under the limit. With n images and none
  recognized the bound is 1 − 0.05^(1/n), so a limit of 0.15 needs n ≥ 19 (0.146), and 0.50 needs n ≥ 5;
- retain checks count paired flips on the same images before and after (an image right before and wrong
  after counts against, wrong before and right after for): drop = (lost − gained) / n. A check needs one
  flip alone not to exceed its limit (n ≥ 1/limit), otherwise it cannot be resolved.

A check whose evidence cannot resolve its limit is "not enough evidence": the gate does not approve on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from clipforget.method.evaluate import EvalReport
from clipforget.method.grid import Cell

CONFIDENCE = 0.95

PASSED, FAILED, UNRESOLVED = "passed", "failed", "not enough evidence"


def upper_bound(hits: int, n: int, confidence: float = CONFIDENCE) -> float:
    """One-sided Clopper–Pearson upper confidence bound of a binomial rate."""
    from scipy.stats import beta

    if n <= 0:
        return 1.0
    if hits >= n:
        return 1.0
    return float(beta.ppf(confidence, hits + 1, n - hits))


def lower_bound(hits: int, n: int, confidence: float = CONFIDENCE) -> float:
    """One-sided Clopper–Pearson lower confidence bound of a binomial rate."""
    from scipy.stats import beta

    if n <= 0 or hits <= 0:
        return 0.0
    return float(beta.ppf(1 - confidence, hits, n - hits + 1))


def samples_for(limit: float, confidence: float = CONFIDENCE) -> int:
    """The fewest images per cell whose upper bound can fall under `limit` (when none is recognized)."""
    return int(np.ceil(np.log(1 - confidence) / np.log(1 - limit))) if 0 < limit < 1 else 1


def flips_for(limit: float) -> int:
    """The fewest images per cell on which one lost image alone does not exceed a drop `limit` (n ≥ 1/limit)."""
    return max(1, int(np.ceil(1 / limit - 1e-9))) if limit > 0 else 1_000_000


def probe_samples_for(limit: float, nearest: int = 3, step: int = 10, confidence: float = CONFIDENCE) -> int:
    """The fewest images per cell (a multiple of `step`) at which a probe exactly at chance passes `limit`: the probe
    tests on half of the forgotten cell's and its `nearest` kept cells' images (clipforget.gate.probe)."""
    for n in range(step, 10_000, step):
        n_test = (1 + nearest) * n // 2
        chance = nearest / (1 + nearest)
        if upper_bound(int(round(chance * n_test)), n_test, confidence) - chance <= limit:
            return n
    raise ValueError(f"no evidence size resolves a probe limit of {limit}")


@dataclass(frozen=True)
class Check:
    name: str
    value: float  # the statistic compared with the limit (an upper bound for forget checks)
    limit: float
    n: int = 0  # images behind the value
    estimate: float | None = None  # the point estimate (accuracy or paired drop)
    interval: tuple[float, float] | None = None
    rule: str = "point estimate"
    resolvable: bool = True  # False: no outcome of n images could pass; the gate says "not enough evidence"
    cell: str = ""  # the deciding cell, when one decides
    lost: int | None = None  # paired retain checks: images of the deciding cell right before and wrong after
    gained: int | None = None  # ... and wrong before, right after
    needs: str = ""  # the evidence that would resolve the limit, said when it is not there

    @property
    def passed(self) -> bool:
        return self.resolvable and bool(self.value <= self.limit + 1e-12)

    @property
    def status(self) -> str:
        if self.passed:
            return PASSED
        if not self.resolvable and (self.estimate is None or self.estimate <= self.limit + 1e-12):
            return UNRESOLVED
        return FAILED

    def to_dict(self) -> dict:
        d = asdict(self)
        d["interval"] = list(self.interval) if self.interval else None
        return {**d, "passed": self.passed, "status": self.status}


# the highest accuracy a single forget cell may keep, per mode
FORGET_CELL_LIMIT = {"global": 0.15, "domain": 0.15, "domain_complete": 0.50}
FORGET_MEAN_LIMIT = 0.25  # domain_complete: mean accuracy over the forgotten domain
MEAN_DROP_LIMIT = 0.03  # global: mean over retain cells; domain: mean over the cells of other classes
RETAIN_CELL_LIMIT = 0.10  # global: the retain cell that lost most; domain: the cell of another class that lost most
SAME_CLASS_LIMIT = 0.05  # domain: the forgotten class in its kept domains, per cell
KEPT_DOMAIN_LIMIT = 0.05  # domain_complete: mean drop of each kept domain


def forget_cell_check(name: str, after: EvalReport, cells: Sequence[Cell], limit: float) -> Check:
    """The worst forget cell by its 95% upper bound."""
    by = after.by_cell()
    bounds = {c: (upper_bound(after.hits(c), by[c].n), by[c].accuracy, by[c].n) for c in cells}
    worst = max(bounds, key=lambda c: (bounds[c][0], bounds[c][1]))
    ub, acc, n = bounds[worst]
    smallest = min(b[2] for b in bounds.values())
    return Check(name, ub, limit, n=n, estimate=max(b[1] for b in bounds.values()),
                 interval=(lower_bound(after.hits(worst), n), ub), rule="95% upper bound (Clopper-Pearson)",
                 resolvable=upper_bound(0, smallest) <= limit, cell=str(worst),
                 needs=f"{samples_for(limit)} images per forgotten cell, the fewest with which a 95% upper bound can "
                       f"fall under {limit:g}; the smallest cell has {smallest}")


def forget_mean_check(name: str, after: EvalReport, cells: Sequence[Cell], limit: float) -> Check:
    """Pooled accuracy over forget cells by its 95% upper bound."""
    by = after.by_cell()
    n = sum(by[c].n for c in cells)
    hits = sum(after.hits(c) for c in cells)
    ub = upper_bound(hits, n)
    return Check(name, ub, limit, n=n, estimate=hits / n if n else float("nan"),
                 interval=(lower_bound(hits, n), ub), rule="95% upper bound (Clopper-Pearson), pooled",
                 resolvable=upper_bound(0, n) <= limit,
                 needs=f"{samples_for(limit)} images over the forgotten cells, the fewest with which a 95% upper bound "
                       f"can fall under {limit:g}; there are {n}")


def _flips(before: EvalReport, after: EvalReport, cell: Cell) -> tuple[int, int, int]:
    """(lost, gained, n) of one cell: paired per image when both reports carry outcomes."""
    b, a = before.by_cell()[cell], after.by_cell()[cell]
    if before.outcomes is not None and after.outcomes is not None and cell in before.outcomes \
            and cell in after.outcomes and len(before.outcomes[cell]) == len(after.outcomes[cell]):
        pairs = list(zip(before.outcomes[cell], after.outcomes[cell], strict=True))
        return sum(1 for x, y in pairs if x and not y), sum(1 for x, y in pairs if y and not x), len(pairs)
    diff = before.hits(cell) - after.hits(cell)  # same images, outcomes not kept: net flips only
    return max(diff, 0), max(-diff, 0), min(b.n, a.n)


def max_drop_check(name: str, before: EvalReport, after: EvalReport, cells: Sequence[Cell], limit: float) -> Check:
    """The retain cell that lost most, by paired flips."""
    flips = {c: _flips(before, after, c) for c in cells}
    drops = {c: (lost - gained) / n for c, (lost, gained, n) in flips.items()}
    worst = max(drops, key=lambda c: drops[c])
    n_min = min(f[2] for f in flips.values())
    lost, gained, n = flips[worst]
    return Check(name, drops[worst], limit, n=n, estimate=drops[worst], rule=f"paired flips ({lost} lost, {gained} "
                 "gained)", resolvable=1 / n_min <= limit + 1e-12, cell=str(worst), lost=lost, gained=gained,
                 needs=f"{flips_for(limit)} images per cell, so that one lost image alone is not over {limit:g}; the "
                       f"smallest cell has {n_min}")


def mean_drop_check(name: str, before: EvalReport, after: EvalReport, cells: Sequence[Cell], limit: float) -> Check:
    """Mean over cells of the paired per-cell drop."""
    flips = [_flips(before, after, c) for c in cells]
    drop = float(np.mean([(lost - gained) / n for lost, gained, n in flips]))
    n = sum(f[2] for f in flips)
    return Check(name, drop, limit, n=n, estimate=drop, rule="paired flips, mean over cells",
                 resolvable=1 / n <= limit + 1e-12,
                 needs=f"{flips_for(limit)} images over the cells, so that one lost image alone is not over {limit:g}; "
                       f"there are {n}")


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
    if mode not in FORGET_CELL_LIMIT:
        raise ValueError(f"unknown mode {mode!r}")
    checks = []
    if mode == "domain_complete":
        checks.append(forget_mean_check("mean forget accuracy", after, forget_m, FORGET_MEAN_LIMIT))
    checks.append(forget_cell_check("max forget-cell accuracy", after, forget_m, FORGET_CELL_LIMIT[mode]))
    if mode == "global" and retain_m:
        checks += [mean_drop_check("mean retain drop", before, after, retain_m, MEAN_DROP_LIMIT),
                   max_drop_check("max retain-cell drop", before, after, retain_m, RETAIN_CELL_LIMIT)]
    if mode == "domain":
        classes = {c.cls for c in forget}
        same = [c for c in retain_m if c.cls in classes]
        other = [c for c in retain_m if c.cls not in classes]
        if same:
            checks.append(max_drop_check("max drop, same class in kept domains", before, after, same,
                                         SAME_CLASS_LIMIT))
        if other:
            # the published target bounds the other classes only on average (0.03 over 32-36 toy cells), which one
            # collapsed cell passes; every cell is also held to the retain-cell limit of `global` (docs/GATE.md)
            checks += [mean_drop_check("mean drop, other cells", before, after, other, MEAN_DROP_LIMIT),
                       max_drop_check("max drop, other cells", before, after, other, RETAIN_CELL_LIMIT)]
    if mode == "domain_complete":
        kept_domains = sorted({c.domain for c in retain_m})
        per_domain = {d: mean_drop_check(f"mean drop of kept domain {d}", before, after,
                                         [c for c in retain_m if c.domain == d], KEPT_DOMAIN_LIMIT)
                      for d in kept_domains}
        if per_domain:
            worst = max(per_domain.values(), key=lambda ch: ch.value)
            checks.append(Check("max mean drop of a kept domain", worst.value, KEPT_DOMAIN_LIMIT, n=worst.n,
                                estimate=worst.estimate, rule=worst.rule,
                                resolvable=all(c.resolvable for c in per_domain.values()),
                                cell=worst.name.rsplit(" ", 1)[-1],
                                needs="; ".join(f"{d}: {c.needs}" for d, c in per_domain.items() if not c.resolvable)))
    return checks


def probe_check(name: str, results: Sequence, limit: float) -> Check:
    """The residual-knowledge audit as a check (clipforget.gate.probe): for each forgotten cell, the 95% upper bound of
    the probe's held-out accuracy minus chance; the worst cell decides. A probe at chance on n held-out images
    resolves the limit only if its own bound does (n of about 100 for 0.10 at a chance of 0.75)."""
    if not results:
        return Check(name, 1.0, limit, rule="linear probe: no forgotten cell had images on both sides",
                     resolvable=False, needs="images of a forgotten cell and of its nearest kept cells")

    def bound(accuracy: float, n: int) -> float:
        return upper_bound(int(round(accuracy * n)), n)

    excess = {r.cell: bound(r.after, r.n_test) - r.chance for r in results}
    worst = max(results, key=lambda r: excess[r.cell])
    return Check(name, excess[worst.cell], limit, n=worst.n_test, estimate=worst.after - worst.chance,
                 interval=(lower_bound(int(round(worst.after * worst.n_test)), worst.n_test) - worst.chance,
                           excess[worst.cell]),
                 rule=f"linear probe vs {', '.join(worst.against)}: 95% upper bound of held-out accuracy minus chance "
                      f"({worst.chance:.2f})",
                 resolvable=all(bound(r.chance, r.n_test) - r.chance <= limit + 1e-12 for r in results),
                 cell=worst.cell, needs=f"held-out images enough for a probe at chance to have a 95% upper bound within "
                                        f"{limit:g} of chance; the smallest test set has {min(r.n_test for r in results)}")
