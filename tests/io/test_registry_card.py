"""The model card, the pictures and the coverage rule of promote/rollback, on their own (no servers)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from clipforget.io import plots
from clipforget.io.card import MAX_CHARS, model_card
from clipforget.io.registry import coverage_gap


def _report(forget: list[str], ledger: dict | None = None) -> dict:
    cells = [{"class": c.split("/")[0], "domain": c.split("/")[1], "role": "forget", "before": 0.98, "after": 0.04,
              "n": 50} for c in forget]
    cells += [{"class": "circle", "domain": "photo", "role": "retain", "before": 1.0, "after": 0.98, "n": 50}]
    rep = {"request_id": "req-1", "requested_by": "privacy@example.com", "mode": "global", "forget_cells": forget,
           "model": {"arch": "toy", "checkpoint": "s3://m/toy.safetensors", "sha256": "b" * 64},
           "output": {"sha256": "c" * 64}, "evaluation": {"data": "s3://eval/ (2000 images)", "images": 2000},
           "metrics": {"forget_before": 0.98, "forget_after": 0.04, "forget_max_after": 0.06, "retain_before": 0.95,
                       "retain_after": 0.95, "retain_max_cell_drop": 0.04, "worst_retain_cell": "tree/sketch"},
           "checks": [{"name": "mode: max forget-cell accuracy", "value": 0.06, "limit": 0.15, "passed": True},
                      {"name": "mode: max retain-cell drop", "value": 0.04, "limit": 0.1, "passed": True,
                       "rule": "95% upper bound", "estimate": 0.02, "n": 50}],
           "cells": cells, "request": {"mode": "global", "classes": ["star"], "domains": []},
           "policy": {"arch": "toy", "checkpoint_uri": "s3://m/toy.safetensors", "data_uri": "s3://eval/",
                      "synthesis": {"prototypes_per_cell": 8, "steps": 400, "target_cosine": 0.77, "seed": 0}}}
    if ledger:
        rep["ledger"] = ledger
    return rep


def test_card_of_a_request_names_cells_checks_base_and_rebuild():
    card = model_card(_report(["star/photo", "star/sketch"]), "toy-x", "3", {"cells": "http://m/cells.png"})
    assert card.startswith("# toy-x version 3") and "forgets 2 cell(s)" in card
    assert "| star/sketch | 0.980 | 0.040 | 50 |" in card and "request `req-1` by privacy@example.com" in card
    assert "| mode: max forget-cell accuracy | 0.0600 | 0.1500 | yes |" in card
    assert "- mode: max retain-cell drop: 95% upper bound; point estimate 0.0200 on n=50" in card
    assert "s3://eval/ (2000 images), 50 per cell over 3 cells" in card and "b" * 64 in card and "c" * 64 in card
    assert ("clipforget unlearn --model toy --checkpoint s3://m/toy.safetensors --mode global --classes star --data "
            "s3://eval/ --prototypes-per-cell 8 --steps 400 --target-cosine 0.77 --seed 0 --request-id req-1") in card
    assert "[cells](http://m/cells.png)" in card


def test_card_says_when_the_verdict_is_data_free():
    from clipforget.gate.verdict import DATA_FREE_CAVEAT

    on_images = model_card(_report(["star/photo"]), "toy-x", "1")
    assert "Data-free verdict" not in on_images
    data_free = _report(["star/photo"])
    data_free.update(evaluation={"data": "held-out prototypes (440 images; data-free)", "images": 440},
                     heldout={"per_cell": "held-out prototypes (10-20/cell)", "reused": 40, "synthesized": 0})
    data_free["policy"]["data_uri"] = None
    card = model_card(data_free, "toy-x", "2")
    assert f"**{DATA_FREE_CAVEAT}**" in card
    assert card.index("## How it was judged") < card.index("Data-free verdict") < card.index("## How to rebuild it")


def test_card_of_a_ledger_build_names_requests_and_head():
    ledger = {"location": "s3://b/ledger/", "head": "ab" * 32, "seq": 4, "request_ids": ["dsr-1", "dsr-2"]}
    card = model_card(_report(["house/sketch"], ledger), "toy-g", "5")
    assert "deletion requests (2): `dsr-1`, `dsr-2`" in card and "ab" * 32 in card
    assert f"clipforget rebuild --head {'ab' * 8} --ledger s3://b/ledger/ --policy policy.json" in card


def test_card_of_a_huge_request_stays_within_mlflows_limit():
    forget = [f"class{i}/sketch" for i in range(345)]
    ids = [f"dsr-{i:05d}" for i in range(500)]
    card = model_card(_report(forget, {"location": "L", "head": "f" * 64, "seq": 499, "request_ids": ids}), "big", "1")
    assert len(card) <= MAX_CHARS
    assert "… and 321 more" in card and "… and 480 more" in card and "## How to rebuild it" in card


def _red_pixels(path) -> int:
    a = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return int(((a[..., 0] > 220) & (a[..., 1] < 80) & (a[..., 2] < 80)).sum())


def test_heatmap_outlines_the_forgotten_cells(tmp_path):
    classes, domains = ["star", "heart", "tree"], ["photo", "sketch"]
    table = [{"class": c, "domain": d, "role": "retain", "before": 0.9, "after": 0.9} for c in classes for d in domains]
    plain = plots.cell_heatmap(table, classes, domains, tmp_path / "plain.png", "none forgotten")
    table[0] = {**table[0], "role": "forget", "after": 0.05}
    marked = plots.cell_heatmap(table, classes, domains, tmp_path / "marked.png", "star/photo forgotten")
    assert open(marked, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert _red_pixels(plain) == 0 and _red_pixels(marked) > 100


def test_prototype_strip_has_a_row_per_cell(tmp_path):
    rng = np.random.default_rng(0)
    images = {"star/photo": rng.integers(0, 255, (4, 64, 64, 3), dtype=np.uint8),
              "star/sketch": rng.random((3, 3, 64, 64)).astype(np.float32)}  # channels first, floats in [0, 1]
    one = Image.open(plots.prototype_strip({"star/photo": images["star/photo"]}, tmp_path / "one.png", "t"))
    two = Image.open(plots.prototype_strip(images, tmp_path / "two.png", "t"))
    assert two.height > one.height * 1.5 and two.width == one.width


def test_coverage_gap():
    v = {"version": "2", "request_ids": ["a", "b"], "ledger_head": "h2"}
    assert coverage_gap(v, ["a", "b"], "h2") is None
    assert coverage_gap(v, [], None) is None
    assert coverage_gap(v, ["a", "b", "c"], "h3") == "version 2 was not built for request(s) c"
    assert "not the current head" in coverage_gap(v, ["a", "b"], "h9")
