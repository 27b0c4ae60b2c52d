"""Shared, expensive fixtures: the shipped toy model, a fresh test render and one prototype bank."""

from __future__ import annotations

import os

import pytest
import torch

from clipforget.io.checkpoints import load_model
from clipforget.method.evaluate import LabelledImages, ZeroShotClassifier, image_features
from clipforget.method.grid import resolve_grid
from clipforget.method.projection import cell_text_embeddings, text_targets
from clipforget.method.prompts import TemplateSet
from clipforget.method.synthesis import SynthesisConfig, synthesize
from clipforget.toyworld.render import render_cells

if os.environ.get("PYTEST_XDIST_WORKER"):
    # workers share the cores: one torch thread each, here and in the processes the tests start (two processes
    # with two threads each on two cores run many times slower than one thread each)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

TEST_SEED = 3  # training used seed 0, setting choices seed 1, docs/RESULTS.md seed 2
PER_CELL = 50


@pytest.fixture(scope="session")
def toy():
    torch.manual_seed(0)
    return load_model("toy", device="cpu")


@pytest.fixture(scope="session")
def toy_grid():
    return resolve_grid("toy")


@pytest.fixture(scope="session")
def test_images(toy, toy_grid):
    imgs, cells = render_cells(toy_grid.cells, PER_CELL, TEST_SEED)
    return LabelledImages.from_arrays(imgs, cells, toy.preprocess)


@pytest.fixture(scope="session")
def classifier(toy, toy_grid):
    return ZeroShotClassifier(toy.model, toy.tokenizer, toy_grid)


@pytest.fixture(scope="session")
def base_report(toy, test_images, classifier):
    return classifier.evaluate(image_features(toy.model, test_images.pixels), test_images.cells)


@pytest.fixture(scope="session")
def text_bank(toy, toy_grid):
    return cell_text_embeddings(toy.model, toy.tokenizer, TemplateSet(), toy_grid.cells)


@pytest.fixture(scope="session")
def prototype_bank(toy, toy_grid, text_bank):
    """The default synthesis settings of `clipforget forget`, for every cell of the toy grid."""
    return synthesize(toy.model, text_targets(text_bank, toy_grid.cells), toy_grid.cells, SynthesisConfig())
