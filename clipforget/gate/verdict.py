"""The verdict on an unlearned model: the checks of its forget groups, decided on evidence (docs/GATE.md).

The gate is what stands between an unlearned model and the registry: each forget group's mode criteria
(`criteria.mode_checks`) plus the request's own thresholds, each reported with its measured value, its
uncertainty and the rule it was decided by. The CLI's `forget` and every flow judge through `judge`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from clipforget.gate.criteria import (
    FORGET_CELL_LIMIT,
    FORGET_MEAN_LIMIT,
    RETAIN_CELL_LIMIT,
    SAME_CLASS_LIMIT,
    Check,
    flips_for,
    forget_cell_check,
    max_drop_check,
    mode_checks,
    probe_check,
    probe_samples_for,
    samples_for,
)
from clipforget.gate.probe import ProbeResult, max_excess
from clipforget.gate.shift import ShiftedCell, shift_check
from clipforget.method.evaluate import EvalReport
from clipforget.method.grid import Cell

# What a verdict on held-out prototypes does and does not claim, for every place a data-free verdict reaches a person
# (the Prefect summary, the registered version's card). How often such an approval misses on images is measured,
# per mode, by bench/requests.py (docs/REQUESTS.md); docs/GATE.md explains where the gap comes from.
DATA_FREE_CAVEAT = (
    "Data-free verdict: the checks ran on held-out prototypes synthesized from the prompts, not on real images. "
    "Real images can keep a forgotten class or lose a kept one where the prototypes do not (the synthetic-to-real "
    "gap); the request benchmark measures how often that makes an approval wrong, per mode (docs/REQUESTS.md). "
    "For a verdict on images, name evaluation images: the policy's `data_uri`, or `--data`."
)
# A data-free rejection is no verdict on images either: the prototypes can lose what images keep (false rejections),
# and some requests are beyond what a projection fitted on prototypes carries (docs/GATE.md). Labelled images are
# the way on: with a projection fitted on 20 images per cell and a verdict on 20 others, the request benchmark's
# 6-request lineage passes at every length (docs/REQUESTS-FIT-IMAGES.md).
DATA_FREE_REJECTION = (
    "Rejected on held-out prototypes, not on real images: prototypes and images disagree in both directions, so the "
    "candidate may still meet its targets on images, and some requests are beyond what a projection fitted on "
    "prototypes carries. Labelled images give a verdict on images (the policy's `data_uri`, or `--data`) and a "
    "projection fitted on them (`fit_uri`, or `--fit-data`), with which the request benchmark's lineage of 6 requests "
    "passes at every length (docs/REQUESTS-FIT-IMAGES.md)."
)


class Thresholds(BaseModel):
    """Request thresholds, checked on top of the mode's criteria unless `mode_criteria` is off."""

    model_config = ConfigDict(extra="forbid")

    max_forget_acc: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False,
                                         description="largest accuracy a forget cell may keep")
    max_retain_drop: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False,
                                          description="largest accuracy drop of any retain cell")
    mode_criteria: bool = Field(default=True, description="also apply the mode's acceptance criteria (criteria.py)")
    max_probe_excess: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False,
                                           description="largest accuracy above chance a linear probe may reach telling "
                                           "a forgotten cell from its nearest kept cells in the released image "
                                           "embedding (95% upper bound; the residual-knowledge audit); default: "
                                           "reported, not checked")

    @model_validator(mode="after")
    def _some_check(self) -> Thresholds:
        if not self.mode_criteria and self.max_forget_acc is None and self.max_retain_drop is None \
                and self.max_probe_excess is None:
            raise ValueError("without the mode's criteria give max_forget_acc, max_retain_drop or max_probe_excess: "
                             "a gate needs a check")
        return self

    def digest_exclude(self) -> set[str]:
        """Fields left out of request and policy digests: a check added later and not set digests as before it
        existed, so registered versions keep their ids."""
        return {"max_probe_excess"} if self.max_probe_excess is None else set()


@dataclass(frozen=True)
class Outcome:
    """Accuracy before/after over forget and retain cells, and the cell that suffered most."""

    forget_before: float
    forget_after: float
    forget_max_after: float
    retain_before: float
    retain_after: float
    retain_drop: float
    retain_max_cell_drop: float
    worst_retain_cell: str

    @classmethod
    def measure(cls, before: EvalReport, after: EvalReport, forget: Sequence[Cell]) -> Outcome:
        fb, fa = before.by_cell(), after.by_cell()
        gone = set(forget)
        f_cells = [c for c in fa if c in gone]
        r_cells = [c for c in fa if c not in gone]
        drops = {c: fb[c].accuracy - fa[c].accuracy for c in r_cells}
        worst = max(drops, key=lambda c: drops[c]) if drops else None
        return cls(
            forget_before=before.mean_over(f_cells),
            forget_after=after.mean_over(f_cells),
            forget_max_after=max((fa[c].accuracy for c in f_cells), default=float("nan")),
            retain_before=before.mean_over(r_cells),
            retain_after=after.mean_over(r_cells),
            retain_drop=before.mean_over(r_cells) - after.mean_over(r_cells),
            retain_max_cell_drop=drops[worst] if worst else 0.0,
            worst_retain_cell=str(worst) if worst else "",
        )


def cell_table(before: EvalReport, after: EvalReport, forget: Sequence[Cell]) -> list[dict]:
    gone, fa = set(forget), after.by_cell()
    return [
        {"class": s.cls, "domain": s.domain, "role": "forget" if s.cell in gone else "retain",
         "before": s.accuracy, "after": fa[s.cell].accuracy, "n": s.n}
        for s in before.cells
    ]


@dataclass(frozen=True)
class ForgetGroup:
    """The cells one request (or one mode of a cumulative ledger build) forgets, judged by that mode's criteria."""

    mode: str
    cells: tuple[Cell, ...]


def group_checks(groups: Sequence[ForgetGroup], before: EvalReport, after: EvalReport) -> list[Check]:
    """The mode criteria of each group. With several modes, each mode is judged on its own forget cells
    against the cells no request forgets (a cell another mode forgot is neither its forget nor its retain)."""
    by_mode: dict[str, list[Cell]] = {}
    for g in groups:
        by_mode.setdefault(g.mode, [])
        by_mode[g.mode] += [c for c in g.cells if c not in by_mode[g.mode]]
    if len(by_mode) == 1:
        mode, cells = next(iter(by_mode.items()))
        return list(mode_checks(mode, before, after, cells))
    checks = []
    for mode, cells in by_mode.items():
        others = {c for m, cs in by_mode.items() if m != mode for c in cs} - set(cells)
        b, a = before.without(others), after.without(others)
        checks += [replace(c, name=f"[{mode}] {c.name}") for c in mode_checks(mode, b, a, cells)]
    return checks


def cumulative_mode(modes: Sequence[str]) -> str:
    """The mode whose default projection settings build a cumulative set: one mode is itself; a mix takes
    the most protective of partially-forgotten classes (domain_complete, then domain, then global)."""
    for m in ("domain_complete", "domain", "global"):
        if m in modes:
            return m
    raise ValueError(f"no known mode in {list(modes)}")


def gate_checks(groups: Sequence[ForgetGroup], before: EvalReport, after: EvalReport,
                thresholds: Thresholds, probe: Sequence[ProbeResult] | None = None,
                shifted: Mapping[Cell, ShiftedCell] | None = None) -> list[Check]:
    """Every check the unlearned model must pass to be registered. `probe`: the residual-knowledge audit of the
    forgotten cells (clipforget.gate.probe), checked when the thresholds set `max_probe_excess`. `shifted`: the
    held-out evidence shifted along its spread (clipforget.gate.shift), given for verdicts on held-out prototypes;
    with the mode's criteria, the other classes of a `domain` request's forgotten domains are held to the retain-cell
    limit under it."""
    checks = group_checks(groups, before, after) if thresholds.mode_criteria else []
    if thresholds.mode_criteria and shifted is not None:
        held = shift_check(groups, shifted)
        if held is not None:
            checks.append(held)
    forget = list(dict.fromkeys(c for g in groups for c in g.cells))
    measured = after.by_cell()
    if thresholds.max_forget_acc is not None:
        checks.append(forget_cell_check("request: max forget-cell accuracy", after,
                                        [c for c in forget if c in measured], thresholds.max_forget_acc))
    retain = [c for c in before.by_cell() if c in measured and c not in set(forget)]
    if thresholds.max_retain_drop is not None and retain:
        checks.append(max_drop_check("request: max retain-cell drop", before, after, retain,
                                     thresholds.max_retain_drop))
    if thresholds.max_probe_excess is not None:
        checks.append(probe_check("request: residual probe above chance", probe or [], thresholds.max_probe_excess))
    return checks


def evidence_per_cell(groups: Sequence[ForgetGroup], cells: Sequence[Cell],
                      thresholds: Thresholds | None = None) -> dict[Cell, int]:
    """The fewest held-out images each cell of `cells` needs for every check of the gate to be resolvable by its
    rule (docs/GATE.md, "How many held-out prototypes"): a forget cell by the 95% upper bound under its mode's
    limit (19 for 0.15), a cell of a partly forgotten class in a kept domain by one flip under 0.05 (20), every other
    cell by one flip under the 0.10 retain-cell limit (10); the request's own thresholds and the probe check raise
    the cells they judge."""
    thresholds = thresholds or Thresholds()
    need = {c: flips_for(RETAIN_CELL_LIMIT) for c in cells}

    def at_least(cs, n: int) -> None:
        for c in cs:
            if c in need:
                need[c] = max(need[c], n)

    forget = {c for g in groups for c in g.cells}
    if thresholds.mode_criteria:
        for g in groups:
            at_least(g.cells, samples_for(FORGET_CELL_LIMIT[g.mode]))
            if g.mode == "domain_complete":  # the pooled bound over the domain
                at_least(g.cells, -(-samples_for(FORGET_MEAN_LIMIT) // max(len(g.cells), 1)))
            if g.mode == "domain":
                classes = {c.cls for c in g.cells}
                at_least([c for c in cells if c.cls in classes and c not in forget], flips_for(SAME_CLASS_LIMIT))
    if thresholds.max_forget_acc is not None:
        at_least(forget, samples_for(thresholds.max_forget_acc))
    if thresholds.max_retain_drop is not None:
        at_least([c for c in cells if c not in forget], flips_for(thresholds.max_retain_drop))
    if thresholds.max_probe_excess is not None:  # the probe's nearest kept cells are known only from the images
        at_least(cells, probe_samples_for(thresholds.max_probe_excess))
    return need


def rejection(check: dict) -> str:
    """Why a check did not pass, in one phrase: a measured miss, or evidence too thin to decide."""
    if check.get("status") == "not enough evidence":
        return f"{check['name']}: not enough evidence (n={check.get('n')}; it needs {check.get('needs') or 'more images'})"
    why = f"{check['name']} {check['value']:.4f} > {check['limit']:.4f}"
    if "upper bound" in str(check.get("rule", "")):
        where = f", {check['cell']}" if check.get("cell") else ""
        why += f" (95% upper bound; measured {check['estimate']:.4f} on n={check['n']}{where})"
    elif check.get("cell") and check.get("lost") is not None:
        why += f" ({check['cell']}: {check['lost']} lost, {check['gained']} gained of n={check['n']})"
    return why


@dataclass(frozen=True)
class Verdict:
    """A model measured against its base on the same images and judged for its forget groups."""

    groups: tuple[ForgetGroup, ...]
    before: EvalReport
    after: EvalReport
    checks: tuple[Check, ...]
    evaluation: str  # what the images were (a data URI, or held-out prototypes)
    probe: tuple[ProbeResult, ...] = ()  # the residual-knowledge audit per forgotten cell, when measured

    @property
    def forget(self) -> list[Cell]:
        return list(dict.fromkeys(c for g in self.groups for c in g.cells))

    @property
    def mode(self) -> str:
        """One mode, or the modes of a cumulative build joined by '+'."""
        return "+".join(dict.fromkeys(g.mode for g in self.groups))

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def images(self) -> int:
        return sum(s.n for s in self.before.cells)

    def outcome(self) -> Outcome:
        return Outcome.measure(self.before, self.after, self.forget)

    def check_dicts(self) -> list[dict]:
        return [c.to_dict() for c in self.checks]

    def rejected(self) -> str | None:
        """Why the model is not registered, one phrase per check that did not pass; None when it passed."""
        failed = [rejection(c) for c in self.check_dicts() if not c["passed"]]
        return "; ".join(failed) or None

    def metrics(self) -> dict[str, float | str]:
        """The outcome, and the probe's largest excess over chance before and after when it was measured."""
        out: dict[str, float | str] = dict(asdict(self.outcome()))
        if self.probe:
            out["probe_excess_before"] = max_excess(self.probe, "before") or 0.0
            out["probe_excess_after"] = max_excess(self.probe, "after") or 0.0
        return out

    def to_dict(self) -> dict[str, Any]:
        """The report's verdict fields: passed, checks, metrics, cells, probe, before, after, evaluation."""
        return {"passed": self.passed, "checks": self.check_dicts(), "metrics": self.metrics(),
                "cells": cell_table(self.before, self.after, self.forget), "probe": [p.to_dict() for p in self.probe],
                "before": self.before.to_dict(), "after": self.after.to_dict(),
                "evaluation": {"data": self.evaluation, "images": self.images}}


def judge(groups: Sequence[ForgetGroup], before: EvalReport, after: EvalReport, thresholds: Thresholds | None = None,
          evaluation: str = "", probe: Sequence[ProbeResult] | None = None,
          shifted: Mapping[Cell, ShiftedCell] | None = None) -> Verdict:
    """The verdict: every check the unlearned model must pass to be registered, on these measurements (`shifted`:
    for a verdict on held-out prototypes, `gate_checks`)."""
    checks = gate_checks(groups, before, after, thresholds or Thresholds(), probe, shifted)
    return Verdict(tuple(groups), before, after, tuple(checks), evaluation, tuple(probe or ()))
