"""The method's steps as functions over files, for orchestration (paths and digests in, paths out).

Each step reads what the previous one wrote (safetensors/JSON) and writes its own result under a
name derived from its inputs' digests, so a step whose output file exists need not run again and
an orchestrator passes only small things between steps.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from clipforget.evaluate import EvalReport, LabelledImages, ZeroShotClassifier, image_features
from clipforget.fold import fold_projection
from clipforget.grid import Cell, Grid
from clipforget.method import NullspaceConfig, cell_text_embeddings, fit_projection
from clipforget.models import LoadedModel, save_checkpoint
from clipforget.nullspace import Projection
from clipforget.prompts import TemplateSet
from clipforget.synthesis import Prototypes


def digest(*parts: object) -> str:
    """A stable sha256 of JSON-able parts (cache keys are built from digests and configs, never objects)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def templates_digest(templates: TemplateSet) -> str:
    return digest(templates.domain_templates, templates.class_templates)


def cell_names(cells: Sequence[Cell]) -> list[str]:
    return [str(c) for c in cells]


def parse_cells(names: Sequence[str]) -> list[Cell]:
    return [Cell(*n.split("/", 1)) for n in names]


# --- text side (step 2) ---

def text_path(root: Path, checkpoint_sha256: str, cells: Sequence[Cell], templates: TemplateSet) -> Path:
    return root / "text" / f"{digest(checkpoint_sha256, cell_names(cells), templates_digest(templates))[:32]}.safetensors"


def save_text(text: dict[Cell, torch.Tensor], path: Path) -> Path:
    from safetensors.torch import save_file

    from clipforget.atomic import atomic_path

    with atomic_path(path) as tmp:
        save_file({str(c): t.contiguous() for c, t in text.items()}, str(tmp))
    return path


def load_text(path: str | Path) -> dict[Cell, torch.Tensor]:
    from safetensors.torch import load_file

    return {Cell(*k.split("/", 1)): v for k, v in load_file(str(path)).items()}


def write_text_embeddings(loaded: LoadedModel, cells: Sequence[Cell], templates: TemplateSet, path: Path) -> Path:
    return save_text(cell_text_embeddings(loaded.model, loaded.tokenizer, templates, cells), path)


# --- nullspace (step 4) ---

def save_projection(projection: Projection, path: Path, forget: Sequence[Cell], retain: Sequence[Cell],
                    config: NullspaceConfig) -> Path:
    from safetensors.torch import save_file

    from clipforget.atomic import atomic_path

    meta = {"summary": json.dumps(projection.summary(), default=str), "config": json.dumps(config.to_dict()),
            "forget_cells": json.dumps(cell_names(forget)), "retain_cells": json.dumps(cell_names(retain))}
    with atomic_path(path) as tmp:
        save_file({"P": projection.P.contiguous()}, str(tmp), metadata=meta)
    return path


def load_projection(path: str | Path) -> tuple[torch.Tensor, dict]:
    """P (float64) and the file's metadata (summary, config, forget/retain cells) decoded from JSON."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
        return f.get_tensor("P"), meta


def build_projection_file(text_file: str | Path, prototypes: Prototypes | None, forget: Sequence[Cell],
                          retain: Sequence[Cell], config: NullspaceConfig, path: Path) -> tuple[Path, dict]:
    projection = fit_projection(forget, retain, load_text(text_file), prototypes, config)
    return save_projection(projection, path, forget, retain, config), projection.summary()


# --- fold (step 5) ---

def fold_checkpoint(loaded: LoadedModel, P: torch.Tensor, out: Path, metadata: dict[str, str]) -> str:
    """Fold P into a copy of the model and save it as an ordinary checkpoint; returns its sha256."""
    model = copy.deepcopy(loaded.model)
    fold_projection(model, P)
    return save_checkpoint(model.state_dict(), out, metadata=metadata)


# --- validation (step 6) ---

def evaluate_pair(base: LoadedModel, unlearned: LoadedModel, images: LabelledImages, grid: Grid,
                  templates: TemplateSet | None = None) -> tuple[EvalReport, EvalReport]:
    """Per-cell zero-shot accuracy of the base and the unlearned model on the same images.

    The classifier comes from the base model's text tower; the fold leaves the text tower untouched,
    so it is the unlearned model's classifier too.
    """
    classifier = ZeroShotClassifier(base.model, base.tokenizer, grid, templates)
    before = classifier.evaluate(image_features(base.model, images.pixels), images.cells)
    after = classifier.evaluate(image_features(unlearned.model, images.pixels), images.cells)
    return before, after


def report_from_json(data: dict) -> EvalReport:
    from clipforget.evaluate import CellScore

    return EvalReport(data["accuracy"], [CellScore(c["class"], c["domain"], c["accuracy"], c["n"]) for c in data["cells"]])


def checks_table(checks: Sequence) -> list[dict]:
    return [c.to_dict() if hasattr(c, "to_dict") else asdict(c) for c in checks]
