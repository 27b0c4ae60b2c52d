"""Cumulative gates over several requests, and the governance audit's findings and report (no model needed)."""

from __future__ import annotations

import pytest

from clipforget.gate.verdict import ForgetGroup, Thresholds, cumulative_mode, gate_checks
from clipforget.governance.compliance import forget_limits, markdown, plot_cells, recognized_again
from clipforget.governance.request import DeletionRequest
from clipforget.method.evaluate import CellScore, EvalReport
from clipforget.method.grid import Cell, resolve_grid

GRID = resolve_grid("toy")
STAR = ForgetGroup("global", tuple(Cell("star", d) for d in GRID.domains))
HOUSE_SKETCH = ForgetGroup("domain", (Cell("house", "sketch"),))


def report(acc: dict[Cell, float], default: float = 1.0) -> EvalReport:
    cells = [CellScore(c.cls, c.domain, acc.get(c, default), 50) for c in GRID.cells]
    return EvalReport(sum(s.accuracy for s in cells) / len(cells), cells)


def test_each_mode_of_a_cumulative_set_is_judged_on_its_own_cells():
    before = report({})
    # 1 of 50 images still recognized: the 95% upper bound (0.091) is under the 0.15 limit
    forgotten = {c: 0.02 for c in STAR.cells} | {Cell("house", "sketch"): 0.02}
    after = report(forgotten)
    checks = gate_checks([STAR, HOUSE_SKETCH], before, after, Thresholds())
    assert [c.name for c in checks][:1] == ["[global] max forget-cell accuracy"]
    assert all(c.passed for c in checks), checks
    # house/sketch is the domain request's forget cell: the global request must not count it as a retain drop
    global_mean_drop = next(c for c in checks if c.name == "[global] mean retain drop")
    assert global_mean_drop.value == pytest.approx(0.0)

    # house in another domain lost 0.2: the domain request's same-class limit (0.05) catches it
    after = report(forgotten | {Cell("house", "photo"): 0.8})
    failed = [c.name for c in gate_checks([STAR, HOUSE_SKETCH], before, after, Thresholds()) if not c.passed]
    assert failed == ["[global] max retain-cell drop", "[domain] max drop, same class in kept domains"]


def test_one_group_keeps_the_plain_mode_check_names():
    checks = gate_checks([STAR], report({}), report({c: 0.0 for c in STAR.cells}), Thresholds(max_forget_acc=0.1))
    assert [c.name for c in checks] == ["max forget-cell accuracy", "mean retain drop", "max retain-cell drop",
                                        "request: max forget-cell accuracy"]


def test_cumulative_mode_prefers_the_most_protective_defaults():
    assert cumulative_mode(["global"]) == "global"
    assert cumulative_mode(["global", "domain"]) == "domain"
    assert cumulative_mode(["domain", "domain_complete", "global"]) == "domain_complete"


def test_report_without_cells_reweights_accuracy():
    r = report({Cell("star", "photo"): 0.0})
    kept = r.without([Cell("star", "photo")])
    assert len(kept.cells) == len(GRID.cells) - 1 and kept.accuracy == pytest.approx(1.0)


def test_recognized_cells_are_named_worst_first_against_the_strictest_limit():
    groups = [STAR, HOUSE_SKETCH, ForgetGroup("domain_complete", tuple(Cell(c, "sketch") for c in GRID.classes))]
    limits = forget_limits(groups, Thresholds())
    assert limits["house/sketch"] == 0.15 and limits["tree/sketch"] == 0.5  # house/sketch: domain's 0.15 is stricter
    assert forget_limits([STAR], Thresholds(max_forget_acc=0.05))["star/photo"] == 0.05
    table = [{"class": c.cls, "domain": c.domain, "role": "forget", "before": 1.0, "after": a}
             for c, a in [(Cell("star", "photo"), 0.1), (Cell("house", "sketch"), 0.9), (Cell("tree", "sketch"), 0.6)]]
    finding = recognized_again(table, limits)
    assert finding is not None and finding.cells == ["house/sketch", "tree/sketch"]
    assert "house/sketch 0.90 > 0.15" in finding.message
    assert recognized_again(table[:1], limits) is None


def test_compliance_report_markdown_and_plot(tmp_path):
    table = [{"class": c.cls, "domain": c.domain, "role": "forget" if c.cls == "star" else "retain", "before": 1.0,
              "after": 0.05 if c.cls == "star" else 0.98} for c in GRID.cells]
    rep = {"registered_name": "m", "time": "2026-11-28T00:00:00+00:00", "passed": False,
           "ledger": {"location": "ledger", "entries": 1, "head": "ab" * 32, "verified": True},
           "champion": {"version": "1", "ledger_head": "ab" * 32, "request_ids": ["r"], "sha256": "cd" * 32},
           "processed": None,
           "findings": [{"kind": "coverage", "message": "champion version 1 was not built for request(s) r2", "cells": []}],
           "audit": {"evaluation": "x", "checks": [{"name": "max forget-cell accuracy", "value": 0.05, "limit": 0.15,
                                                     "passed": True}],
                     "metrics": {"forget_before": 1.0, "forget_after": 0.05, "forget_max_after": 0.05,
                                 "retain_before": 1.0, "retain_after": 0.98},
                     "cells": table, "limits": {f"star/{d}": 0.15 for d in GRID.domains}}}
    md = markdown(rep)
    assert md.startswith("# Governance of `m`: VIOLATION") and "**coverage**: champion version 1" in md
    assert "| star/photo | 1.000 | 0.050 | 0.15 |" in md
    png = plot_cells(table, tmp_path / "cells.png", "title")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_deletion_request_cells_are_checked_against_the_grid():
    with pytest.raises(ValueError, match="unicorn"):
        DeletionRequest(request_id="r", mode="global", classes=["unicorn"]).cells(GRID)
    with pytest.raises(ValueError):
        DeletionRequest(request_id="../x", mode="global", classes=["star"])
    assert DeletionRequest(request_id="r", mode="global", classes=["star"]).cells(GRID) == list(STAR.cells)
