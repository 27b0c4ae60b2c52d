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
from dataclasses import dataclass
from pathlib import Path

import torch

from clipforget.gate.probe import ProbeResult, residual_probe
from clipforget.gate.shift import ShiftedCell, shifted_evidence
from clipforget.io.checkpoints import LoadedModel, save_checkpoint
from clipforget.method.evaluate import EvalReport, LabelledImages, ZeroShotClassifier, image_features
from clipforget.method.fold import FoldedMap, fold_projection, folded_map
from clipforget.method.grid import Cell
from clipforget.method.nullspace import Projection
from clipforget.method.projection import NullspaceConfig, cell_text_embeddings, fit_projection
from clipforget.method.prompts import TemplateSet
from clipforget.method.synthesis import Prototypes


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

CLASSIFIER_KEY = "__classifier__"  # the zero-shot classifier rows, stored beside the cells' text embeddings


def text_path(root: Path, checkpoint_sha256: str, cells: Sequence[Cell], templates: TemplateSet) -> Path:
    key = digest("text+classifier", checkpoint_sha256, cell_names(cells), templates_digest(templates))
    return root / "text" / f"{key[:32]}.safetensors"


def save_text(text: dict[Cell, torch.Tensor], path: Path,
              classifier: tuple[Sequence[str], torch.Tensor] | None = None) -> Path:
    from safetensors.torch import save_file

    from clipforget.io.atomic import atomic_path

    tensors = {str(c): t.contiguous() for c, t in text.items()}
    meta = {}
    if classifier is not None:
        tensors[CLASSIFIER_KEY] = classifier[1].contiguous()
        meta["classes"] = json.dumps(list(classifier[0]))
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def load_text(path: str | Path) -> dict[Cell, torch.Tensor]:
    from safetensors.torch import load_file

    return {Cell(*k.split("/", 1)): v for k, v in load_file(str(path)).items() if k != CLASSIFIER_KEY}


def load_classifier(path: str | Path) -> tuple[list[str], torch.Tensor] | None:
    """The zero-shot classifier (class names, rows) stored with the text embeddings, if any."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if CLASSIFIER_KEY not in f.keys() or "classes" not in meta:  # noqa: SIM118 - safe_open has keys() only
            return None
        return json.loads(meta["classes"]), f.get_tensor(CLASSIFIER_KEY)


def write_text_embeddings(loaded: LoadedModel, cells: Sequence[Cell], templates: TemplateSet, path: Path) -> Path:
    """The cells' prompt embeddings and the zero-shot classifier of their classes over their domains."""
    from clipforget.method.prompts import class_text_embeddings

    classes = list(dict.fromkeys(c.cls for c in cells))
    domains = list(dict.fromkeys(c.domain for c in cells))
    rows = class_text_embeddings(loaded.model, loaded.tokenizer, templates, classes, domains, loaded.device).cpu()
    return save_text(cell_text_embeddings(loaded.model, loaded.tokenizer, templates, cells), path, (classes, rows))


# --- nullspace (step 4) ---

def save_projection(projection: Projection, path: Path, forget: Sequence[Cell], retain: Sequence[Cell],
                    config: NullspaceConfig) -> Path:
    from safetensors.torch import save_file

    from clipforget.io.atomic import atomic_path

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
    projection = fit_projection(forget, retain, load_text(text_file), prototypes, config, load_classifier(text_file))
    return save_projection(projection, path, forget, retain, config), projection.summary()


# --- fold (step 5) ---

def checkpoint_metadata(*, base_sha256: str, arch: str, mode: str, forget_cells: Sequence[str],
                        request_id: str | None = None) -> dict[str, str]:
    """The safetensors metadata of an unlearned checkpoint: what it was made from and what it forgets. It depends
    on the build only, so a rebuild of the same request gives the same bytes."""
    meta = {"clipforget.base_sha256": base_sha256, "clipforget.arch": arch, "clipforget.mode": mode,
            "clipforget.forget_cells": ",".join(forget_cells)}
    if request_id is not None:
        meta["clipforget.request_id"] = request_id
    return meta


def fold_checkpoint(loaded: LoadedModel, P: torch.Tensor, out: Path, metadata: dict[str, str]) -> str:
    """Fold P into a copy of the model and save it as an ordinary checkpoint; returns its sha256."""
    model = copy.deepcopy(loaded.model)
    fold_projection(model, P)
    return save_checkpoint(model.state_dict(), out, metadata=metadata)


# --- validation (step 6) ---

@dataclass(frozen=True)
class Comparison:
    """Base and unlearned model on the same images: per-cell accuracy, the residual-knowledge probe of the
    forgotten cells (clipforget.gate.probe) and, for the cells asked for, the images' features shifted along their
    spread (clipforget.gate.shift; what the gate holds verdicts on held-out prototypes to)."""

    before: EvalReport
    after: EvalReport
    probe: list[ProbeResult]
    shifted: dict[Cell, ShiftedCell]


def compare_features(classifier: ZeroShotClassifier, before: torch.Tensor, after: torch.Tensor, cells: Sequence[Cell],
                     forget: Sequence[Cell] = (), shift: Sequence[Cell] = ()) -> Comparison:
    """Per-cell zero-shot accuracy of the base and the unlearned model on the same images (their image embeddings
    `before`/`after`, rows of `cells`), the residual-knowledge probe of the forgotten cells, and the shifted evidence
    of the cells `shift` (`shift_cells` of a verdict on held-out prototypes; none on images, where the images
    decide)."""
    cells = [Cell(*c) for c in cells]
    probe = residual_probe(before, after, cells, forget) if forget else []
    shifted = shifted_evidence(before, after, cells, classifier.cell_accuracy, of=set(shift)) if shift else {}
    return Comparison(classifier.evaluate(before, cells), classifier.evaluate(after, cells), probe, shifted)


def compare_models(classifier: ZeroShotClassifier, base: torch.nn.Module, unlearned: torch.nn.Module,
                   images: LabelledImages, forget: Sequence[Cell] = (), shift: Sequence[Cell] = ()) -> Comparison:
    """`compare_features` of two models run on the same images."""
    return compare_features(classifier, image_features(base, images.pixels), image_features(unlearned, images.pixels),
                            images.cells, forget, shift)


def verified_fold(base: LoadedModel, candidate: str | Path) -> FoldedMap | None:
    """The candidate checkpoint as a fold of the base (`clipforget.method.fold.folded_map`: every tensor but the
    image tower's last linear map bitwise the base's, the map M' = P M), or None when it is not one.

    With it, the candidate's image embeddings are the base's mapped by P exactly (to float32 rounding): the gate
    judges the very weights it reads from the candidate's file without running its image tower again."""
    from safetensors.torch import load_file

    return folded_map(base.model, load_file(str(candidate)))
