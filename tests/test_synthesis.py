"""Prototype synthesis: seeded and reproducible, per-cell independent of the batch, early stopping,
progress reports, and prototypes that the model recognizes as their cell."""

from __future__ import annotations

import torch

from clipforget.evaluate import LabelledImages, image_features
from clipforget.grid import Cell
from clipforget.method import text_targets
from clipforget.synthesis import SynthesisConfig, synthesize

CELLS = [Cell("star", "sketch"), Cell("house", "photo"), Cell("circle", "cartoon")]


def test_reproducible_and_independent_of_the_batch(toy, text_bank):
    cfg = SynthesisConfig(prototypes_per_cell=2, steps=15, seed=4)
    targets = text_targets(text_bank, CELLS)
    a = synthesize(toy.model, targets, CELLS, cfg)
    b = synthesize(toy.model, targets, CELLS, cfg)
    assert torch.equal(a.embeddings, b.embeddings)
    alone = synthesize(toy.model, targets[1:2], CELLS[1:2], cfg)
    assert torch.allclose(alone.embeddings, a.for_cell(CELLS[1]), atol=1e-3)
    other_seed = synthesize(toy.model, targets, CELLS, SynthesisConfig(prototypes_per_cell=2, steps=15, seed=5))
    assert not torch.allclose(other_seed.embeddings, a.embeddings, atol=1e-3)
    assert torch.allclose(a.embeddings.norm(dim=-1), torch.ones(6), atol=1e-5)


def test_early_stop_progress_and_images(toy, text_bank):
    seen = []
    cfg = SynthesisConfig(prototypes_per_cell=2, steps=200, target_cosine=0.3, check_every=5, seed=1)
    p = synthesize(toy.model, text_targets(text_bank, CELLS), CELLS, cfg, progress=seen.append, return_images=True)
    assert p.reached.all() and int(p.steps_used.max()) < 200  # every image stopped at the easy target
    assert seen and {"step", "steps", "active", "mean_cosine"} <= set(seen[0])
    assert seen[-1]["active"] == 0
    assert p.images is not None and p.images.shape == (6, 64, 64, 3) and p.images.dtype == torch.uint8


def test_prototypes_are_recognized_as_their_cell(toy, prototype_bank, classifier):
    """The default settings' prototypes (the bank the mode tests use) carry their cell's class."""
    report = classifier.evaluate(prototype_bank.embeddings, prototype_bank.cells)
    assert report.accuracy >= 0.9
    assert float(prototype_bank.cosines.mean()) > 0.6


def test_prototype_images_encode_like_their_embeddings(toy, text_bank):
    """The 8-bit images handed out for inspection are the prototypes: re-encoded, they land where they were."""
    cfg = SynthesisConfig(prototypes_per_cell=2, steps=60, seed=9)
    p = synthesize(toy.model, text_targets(text_bank, CELLS), CELLS, cfg, return_images=True)
    images = LabelledImages.from_arrays(p.images, p.cells, toy.preprocess)
    again = torch.nn.functional.normalize(image_features(toy.model, images.pixels), dim=-1)
    assert float((again * p.embeddings).sum(-1).min()) > 0.9
