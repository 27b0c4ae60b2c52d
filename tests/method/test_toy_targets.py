"""The issue's targets on the shipped toy model, measured on a fresh render (seed 3, 50 images per
cell) with the folded model: each projection is folded into a copy of the model, and the copy's embeddings are
evaluated (its verified last linear map applied to the base's features, `folded_features`; the first case also
runs the copy's whole image tower and compares)."""

from __future__ import annotations

import copy

import pytest
import torch

from clipforget.gate.criteria import mode_checks
from clipforget.method.evaluate import image_features
from clipforget.method.fold import fold_projection
from clipforget.method.grid import forget_cells, retain_cells
from clipforget.method.projection import default_config, fit_projection

pytestmark = pytest.mark.slow


def test_toy_model_accuracy_in_every_domain(base_report, toy_grid):
    for d in toy_grid.domains:
        acc = base_report.mean_over([c for c in toy_grid.cells if c.domain == d])
        assert acc >= 0.90, f"{d}: {acc:.3f}"


def _unlearn_and_check(toy_grid, text_bank, prototype_bank, test_images, classifier, base_report, folded_features,
                       mode, classes, domains):
    forget = forget_cells(toy_grid, mode, classes, domains)
    proj = fit_projection(forget, retain_cells(toy_grid, forget), text_bank, prototype_bank, default_config(mode),
                          (classifier.classes, classifier.weights))
    after = classifier.evaluate(folded_features(proj.P), test_images.cells)
    checks = mode_checks(mode, base_report, after, forget)
    return checks, after, proj


@pytest.mark.parametrize("mode,classes,domains", [
    ("global", ["star"], []),
    ("global", ["heart", "cross", "tree"], []),
    ("domain", ["house"], ["sketch"]),
])
def test_mode_targets(toy, toy_grid, text_bank, prototype_bank, test_images, classifier, base_report, folded_features,
                      mode, classes, domains):
    checks, after, proj = _unlearn_and_check(toy_grid, text_bank, prototype_bank, test_images, classifier, base_report,
                                             folded_features, mode, classes, domains)
    missed = [f"{c.name}: {c.value:.3f} > {c.limit}" for c in checks if not c.passed]
    assert not missed, "; ".join(missed)
    if mode == "global" and classes == ["star"]:  # once: the folded copy's own image tower says the same
        model = copy.deepcopy(toy.model)
        fold_projection(model, proj.P)
        run = image_features(model, test_images.pixels)
        torch.testing.assert_close(run, folded_features(proj.P), atol=1e-4, rtol=1e-4)
        assert classifier.evaluate(run, test_images.cells).outcomes == after.outcomes


def test_domain_complete_hits_the_forgotten_domain_hardest(toy_grid, text_bank, prototype_bank, test_images,
                                                          classifier, base_report, folded_features):
    _, after, _ = _unlearn_and_check(toy_grid, text_bank, prototype_bank, test_images, classifier, base_report,
                                     folded_features, "domain_complete", [], ["sketch"])
    drop = {d: base_report.mean_over([c for c in toy_grid.cells if c.domain == d])
            - after.mean_over([c for c in toy_grid.cells if c.domain == d]) for d in toy_grid.domains}
    assert drop["sketch"] > 2 * max(v for d, v in drop.items() if d != "sketch"), drop


@pytest.mark.xfail(strict=True, reason="fitted on prototypes, no fold tried forgets a whole domain of a near-additive "
                   "embedding (77% class, "
                   "22% domain, <1% interaction energy): the default keeps the other domains near the 0.05 limit "
                   "(0.06 on this render) and leaves sketch accuracy near 0.7; see docs/RESULTS.md, trade-off table")
def test_domain_complete_targets(toy_grid, text_bank, prototype_bank, test_images, classifier, base_report,
                                 folded_features):
    checks, _, _ = _unlearn_and_check(toy_grid, text_bank, prototype_bank, test_images, classifier, base_report,
                                      folded_features, "domain_complete", [], ["sketch"])
    missed = [f"{c.name}: {c.value:.3f} > {c.limit}" for c in checks if not c.passed]
    assert not missed, "; ".join(missed)

