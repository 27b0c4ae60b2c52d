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
def prototype_bank(toy, toy_grid, text_bank, tmp_path_factory):
    """The default synthesis settings of `clipforget forget`, for every cell of the toy grid.

    Under pytest-xdist the workers share one prototype bank in this run's temporary folder: the first worker to
    get there synthesizes (one thread, so the bits do not depend on which worker it is), the other loads its files.
    """
    targets = text_targets(text_bank, toy_grid.cells)
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return synthesize(toy.model, targets, toy_grid.cells, SynthesisConfig())
    import fcntl

    from clipforget.io.bank import PrototypeBank, load_prototypes, synthesize_with_bank

    shared = tmp_path_factory.getbasetemp().parent / "shared-prototype-bank"  # this run's, common to its workers
    shared.mkdir(exist_ok=True)
    config = SynthesisConfig().resolved(toy.device)
    with open(shared / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        paths, _ = synthesize_with_bank(toy.model, dict(zip(toy_grid.cells, targets, strict=True)), toy_grid.cells,
                                        config, toy.sha256 or "", PrototypeBank(shared))
    return load_prototypes(paths, config)
