"""The governance audit's findings and report, and requests against the grid (no model needed)."""

from __future__ import annotations

import pytest

from clipforget.gate.verdict import ForgetGroup, Thresholds
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
