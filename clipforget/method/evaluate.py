"""Zero-shot evaluation per (class, domain) cell (docs/DESIGN.md, step 6).

A class is predicted from domain-ensembled prompts (one classifier row per class: the mean of its
prompts in every domain of the grid). Accuracy is measured on a labelled folder, or on images kept in
memory (rendered toy images, held-out prototypes for data-free validation).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from clipforget.method.data import check_labelled_folder
from clipforget.method.grid import Cell, Grid
from clipforget.method.prompts import TemplateSet, class_text_embeddings


@dataclass
class LabelledImages:
    """Preprocessed pixels [N, 3, H, W] and the cell of each image."""

    pixels: torch.Tensor
    cells: list[Cell]

    @classmethod
    def from_folder(cls, root: str | Path, preprocess: Callable, grid: Grid | None = None) -> LabelledImages:
        return cls.from_items(check_labelled_folder(root, grid), preprocess)  # a corrupt file fails here, naming it

    @classmethod
    def from_items(cls, items: Sequence[tuple[Path, Cell]], preprocess: Callable) -> LabelledImages:
        """The images of a checked folder's (path, cell) list (`check_labelled_folder`), decoded in that order."""
        from PIL import Image

        pixels = []
        for path, _ in items:
            try:
                with Image.open(path) as im:
                    pixels.append(preprocess(im.convert("RGB")))
            except (OSError, SyntaxError, ValueError) as e:  # bytes that pass the header check but do not decode
                raise ValueError(f"image {path} is not a readable image: {type(e).__name__}: "
                                 f"{' '.join(str(e).split())[:200]}") from None
        return cls(torch.stack(pixels), [c for _, c in items])

    @classmethod
    def from_arrays(cls, images: np.ndarray | torch.Tensor, cells: Sequence[Cell], preprocess: Callable) -> LabelledImages:
        """uint8 [N, H, W, 3] images through the model's own preprocessing, as a folder would be."""
        return cls(preprocess_arrays(images, preprocess), [Cell(*c) for c in cells])


def preprocess_arrays(images: np.ndarray | torch.Tensor, preprocess: Callable) -> torch.Tensor:
    """uint8 [N, H, W, 3] images → the model's input [N, 3, h, w] through its own preprocessing."""
    from PIL import Image

    arr = images.numpy() if isinstance(images, torch.Tensor) else images
    return torch.stack([preprocess(Image.fromarray(a)) for a in arr])


@torch.no_grad()
def image_features(model: Any, pixels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Unnormalized image features [N, d] in float32 (the space the projection acts on)."""
    device = next(model.parameters()).device
    out = [model.encode_image(pixels[i : i + batch_size].to(device)).float().cpu()
           for i in range(0, len(pixels), batch_size)]
    return torch.cat(out)


@dataclass(frozen=True)
class CellScore:
    cls: str
    domain: str
    accuracy: float
    n: int

    @property
    def cell(self) -> Cell:
        return Cell(self.cls, self.domain)

    def to_dict(self) -> dict:
        return {"class": self.cls, "domain": self.domain, "accuracy": self.accuracy, "n": self.n}


@dataclass(frozen=True)
class EvalReport:
    accuracy: float
    cells: list[CellScore]
    # per cell, whether each image was classified correctly (in image order): before/after reports on the same
    # images pair up image by image, so the gate counts flips rather than comparing two noisy rates
    outcomes: dict[Cell, tuple[int, ...]] | None = None

    def hits(self, cell: Cell) -> int:
        s = self.by_cell()[cell]
        return int(round(s.accuracy * s.n))

    def by_cell(self) -> dict[Cell, CellScore]:
        return {s.cell: s for s in self.cells}

    def mean_over(self, cells: Iterable[Cell]) -> float:
        """Unweighted mean of per-cell accuracy over the given cells that were measured."""
        by = self.by_cell()
        vals = [by[c].accuracy for c in cells if c in by]
        return float(np.mean(vals)) if vals else float("nan")

    def without(self, cells: Iterable[Cell]) -> EvalReport:
        """The report over every measured cell but these (overall accuracy re-weighted by image counts)."""
        drop = set(cells)
        kept = [s for s in self.cells if s.cell not in drop]
        n = sum(s.n for s in kept)
        outcomes = {c: o for c, o in self.outcomes.items() if c not in drop} if self.outcomes is not None else None
        return EvalReport(sum(s.accuracy * s.n for s in kept) / n if n else float("nan"), kept, outcomes)

    def to_dict(self) -> dict:
        return {"accuracy": self.accuracy, "cells": [s.to_dict() for s in self.cells]}


def zero_shot_scores(features: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """Cosine scores [N, n_classes] of (unnormalized) image features against classifier rows."""
    return F.normalize(features.float(), dim=-1) @ classifier.float().T


def score_cells(predicted: Sequence[str], cells: Sequence[Cell]) -> EvalReport:
    """Per-cell accuracy of predicted class names against each image's cell, in first-seen cell order."""
    hits: dict[Cell, list[int]] = {}
    for p, c in zip(predicted, cells, strict=True):
        hits.setdefault(Cell(*c), []).append(int(p == c[0]))
    scores = [CellScore(c.cls, c.domain, float(np.mean(h)), len(h)) for c, h in hits.items()]
    total = sum(sum(h) for h in hits.values()) / max(1, len(cells))
    return EvalReport(float(total), scores, {c: tuple(h) for c, h in hits.items()})


class ZeroShotClassifier:
    """Class rows from domain-ensembled prompts; predicts among the grid's classes."""

    def __init__(self, model, tokenizer, grid: Grid, templates: TemplateSet | None = None) -> None:
        self.classes = list(grid.classes)
        device = next(model.parameters()).device
        self.weights = class_text_embeddings(model, tokenizer, templates or TemplateSet(), grid.classes,
                                             grid.domains, device).cpu()

    def predict(self, features: torch.Tensor) -> list[str]:
        return [self.classes[i] for i in zero_shot_scores(features, self.weights).argmax(-1).tolist()]

    def evaluate(self, features: torch.Tensor, cells: Sequence[Cell]) -> EvalReport:
        return score_cells(self.predict(features), cells)

    def cell_accuracy(self, features: torch.Tensor, cell: Cell) -> float:
        """The share of `features` classified as `cell`'s class."""
        return float(np.mean([p == cell.cls for p in self.predict(features)])) if len(features) else float("nan")
