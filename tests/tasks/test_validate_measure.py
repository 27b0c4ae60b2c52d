"""The gate's measurement: a candidate that is a fold of its base is judged on the base's cached embeddings through
its own last linear map, and the verdict is the one running the candidate gives; anything else is run."""

from __future__ import annotations

import copy

import pytest
import torch

import clipforget.method.evaluate as evaluate
from clipforget.io.bank import PrototypeBank
from clipforget.io.checkpoints import load_model, save_checkpoint
from clipforget.method.evaluate import LabelledImages, ZeroShotClassifier, image_features
from clipforget.method.fold import fold_projection
from clipforget.method.grid import Cell
from clipforget.method.synthesis import Prototypes, SynthesisConfig
from clipforget.steps import compare_models
from clipforget.toyworld.render import render_cells

FORGET = Cell("star", "sketch")


@pytest.fixture
def heldout(toy, toy_grid, tmp_path, monkeypatch):
    """Bank files with images (rendered ones stand in for held-out prototypes), in a fresh cache."""
    monkeypatch.setenv("CLIPFORGET_CACHE", str(tmp_path / "cache"))
    imgs, cells = render_cells(toy_grid.cells, 6, seed=11)
    config = SynthesisConfig(prototypes_per_cell=6, seed=11)
    n = len(cells)
    protos = Prototypes(torch.zeros(n, 128), [Cell(*c) for c in cells], torch.zeros(n), torch.zeros(n, dtype=torch.long),
                        0.0, config, torch.from_numpy(imgs))
    files = PrototypeBank(tmp_path / "bank").put(toy.sha256, protos, with_images=True)
    return [str(f) for f in files], config, imgs, cells


def _candidate(toy, text_bank, path, tamper: bool = False):
    """The toy model with star's sketch cell's text direction projected out (a real fold), saved; `tamper` also
    nudges one weight of the tower's first layer: then it is not a fold of the base any more."""
    u = torch.nn.functional.normalize(text_bank[FORGET].double().reshape(-1, 128).mean(0), dim=0)
    model = copy.deepcopy(toy.model)
    fold_projection(model, torch.eye(128, dtype=torch.float64) - 1.5 * torch.outer(u, u))  # push the cell past it
    if tamper:
        with torch.no_grad():
            model.visual.conv1.weight[0, 0, 0, 0] += 0.05
    save_checkpoint(model.state_dict(), path)
    return str(path)


@pytest.mark.parametrize("tamper", [False, True], ids=["fold", "not-a-fold"])
def test_measured_verdict_is_the_candidates_own(toy, toy_grid, text_bank, heldout, tmp_path, monkeypatch, tamper):
    from tasks.validate import measure

    files, config, imgs, cells = heldout
    candidate = _candidate(toy, text_bank, tmp_path / "candidate.safetensors", tamper)
    args = dict(thresholds={}, data_path=None, heldout_files=files, synthesis={"prototypes_per_cell": 6, "seed": 11},
                data_uri=None)
    base = {"path": toy.checkpoint, "sha256": toy.sha256}
    verdict = measure("toy", base, {"path": candidate}, toy_grid.to_dict(), [{"mode": "domain", "cells": [str(FORGET)]}],
                      **args)

    # what running both models on the same images gives
    images = LabelledImages.from_arrays(imgs, cells, toy.preprocess)
    running = compare_models(ZeroShotClassifier(toy.model, toy.tokenizer, toy_grid), toy.model,
                             load_model("toy", candidate).model, images, [FORGET])
    assert verdict.before.to_dict() == running.before.to_dict()
    assert verdict.after.to_dict() == running.after.to_dict()
    assert [p.to_dict() for p in verdict.probe] == [p.to_dict() for p in running.probe]
    # the request did forget something
    assert verdict.after.by_cell()[FORGET].accuracy < verdict.before.by_cell()[FORGET].accuracy

    # the base's embeddings are cached per checkpoint and bank file: a second request runs no image tower at all
    # unless its candidate is not a fold (then that candidate, and only it, is run)
    cached = list((tmp_path / "cache" / "features" / toy.sha256).glob("*.safetensors"))
    assert len(cached) == len(files)
    runs = []
    monkeypatch.setattr(evaluate, "image_features", lambda model, pixels, **kw: runs.append(model) or
                        image_features(model, pixels, **kw))
    import tasks.validate

    monkeypatch.setattr(tasks.validate, "image_features", evaluate.image_features)
    again = measure("toy", base, {"path": candidate}, toy_grid.to_dict(), [{"mode": "domain", "cells": [str(FORGET)]}],
                    **args)
    assert again.after.to_dict() == verdict.after.to_dict()
    assert len(runs) == (1 if tamper else 0)


def test_evaluation_images_are_embedded_once_per_checkpoint_and_content(toy, toy_grid, text_bank, heldout, tmp_path,
                                                                       monkeypatch):
    """A request judged on an image folder: the base's embeddings of exactly those bytes are cached, so the next
    request on the same images runs no image tower; one image's bytes changed is new content, embedded again,
    and every verdict is the one running both models on the folder gives."""
    import tasks.validate
    from clipforget.method.data import write_image
    from tasks.validate import measure

    _, _, imgs, cells = heldout
    folder = tmp_path / "eval"
    for i, (image, cell) in enumerate(zip(imgs, cells, strict=True)):
        write_image(folder, Cell(*cell), i, image)
    candidate = _candidate(toy, text_bank, tmp_path / "candidate.safetensors")
    base = {"path": toy.checkpoint, "sha256": toy.sha256}
    runs: list = []
    monkeypatch.setattr(tasks.validate, "image_features", lambda model, pixels, **kw: runs.append(model) or
                        image_features(model, pixels, **kw))
    monkeypatch.setattr(evaluate, "image_features", tasks.validate.image_features)

    def judged():
        runs.clear()
        verdict = measure("toy", base, {"path": candidate}, toy_grid.to_dict(),
                          [{"mode": "domain", "cells": [str(FORGET)]}], thresholds={}, data_path=str(folder),
                          heldout_files=None, synthesis=None, data_uri=None)
        ran = len(runs)
        images = LabelledImages.from_folder(folder, toy.preprocess, toy_grid)
        running = compare_models(ZeroShotClassifier(toy.model, toy.tokenizer, toy_grid), toy.model,
                                 load_model("toy", candidate).model, images, [FORGET])
        assert verdict.before.to_dict() == running.before.to_dict()
        assert verdict.after.to_dict() == running.after.to_dict()
        return ran

    assert judged() == 1  # first time: the base runs on the folder
    assert judged() == 0  # the same bytes: cached
    changed = sorted((folder / "sketch" / "star").glob("*.png"))[0]
    changed.write_bytes(sorted((folder / "photo" / "star").glob("*.png"))[0].read_bytes())
    assert judged() == 1  # one image's bytes changed: embedded again
    assert judged() == 0
