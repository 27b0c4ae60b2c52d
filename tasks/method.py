"""Steps 2-5 of the method as Prefect tasks: text embeddings, prototypes, projection, fold.

Thin wrappers over `clipforget.steps` and `clipforget.bank`: they take and return paths, digests and
small dicts, never tensors or models.
"""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from clipforget.bank import PrototypeBank, load_prototypes, synthesize_with_bank
from clipforget.method import NullspaceConfig, text_targets
from clipforget.prompts import TemplateSet
from clipforget.steps import (
    build_projection_file,
    digest,
    fold_checkpoint,
    load_projection,
    load_text,
    parse_cells,
    text_path,
    write_text_embeddings,
)
from clipforget.synthesis import SynthesisConfig
from tasks.common import file_cache_key, loaded_model, work_root


def _text_file(p: dict) -> Path:
    return text_path(work_root(), p["sha256"], parse_cells(p["cells"]), TemplateSet())


@task(name="generate_prompts", cache_key_fn=file_cache_key(_text_file), persist_result=True, result_serializer="json")
def generate_prompts(arch: str, checkpoint: str, sha256: str, cells: list[str]) -> str:
    """Domain-aware prompts per cell → their normalized text embeddings (a safetensors file)."""
    path = _text_file({"sha256": sha256, "cells": cells})
    if not path.is_file():
        write_text_embeddings(loaded_model(arch, checkpoint, sha256), parse_cells(cells), TemplateSet(), path)
    get_run_logger().info("text embeddings of %d cells at %s", len(cells), path)
    return str(path)


def _progress_logger(every: int):
    logger = get_run_logger()

    def log(p: dict) -> None:
        if p["step"] % every == 0 or p["step"] == p["steps"]:
            logger.info("synthesis: images %d-%d of %d, step %d/%d, %d still active, mean cosine %.3f",
                        p["offset"] + 1, p["offset"] + p["images"], p["total"], p["step"], p["steps"], p["active"],
                        p["mean_cosine"])
    return log


@task(name="synthesize_prototypes", tags=["gpu"])
def synthesize_prototypes(arch: str, checkpoint: str, sha256: str, text_file: str, cells: list[str],
                          synthesis: dict, with_images: bool = False) -> dict:
    """Visual prototypes per cell from the prototype bank, synthesizing only the cells it lacks.

    Returns {paths (one bank file per cell, in `cells` order), reused, synthesized, seconds}.
    """
    logger = get_run_logger()
    config = SynthesisConfig(**synthesis)
    bank = PrototypeBank(work_root() / "prototypes")
    wanted = parse_cells(cells)
    missing = [c for c in wanted if not bank.has(sha256, c, config, with_images)]
    logger.info("prototype bank: %d of %d cells reused, %d to synthesize (%d prototypes/cell, %d steps, seed %d)",
                len(wanted) - len(missing), len(wanted), len(missing), config.prototypes_per_cell, config.steps,
                config.seed)
    model = loaded_model(arch, checkpoint, sha256).model if missing else None
    text = load_text(text_file)
    targets = dict(zip(wanted, text_targets(text, wanted), strict=True))
    paths, report = synthesize_with_bank(model, targets, wanted, config, sha256, bank, with_images,
                                         _progress_logger(max(1, config.steps // 6)))
    logger.info("prototype bank: reused %d cells, synthesized %d in %.1f s", len(report.hits),
                len(report.synthesized), report.seconds)
    return {"paths": [str(p) for p in paths], "reused": len(report.hits), "synthesized": len(report.synthesized),
            "seconds": round(report.seconds, 3)}


def _projection_file(p: dict) -> Path:
    key = digest(p["text_file"], p["prototype_files"], p["forget"], p["retain"], p["nullspace"])
    return work_root() / "projections" / f"{key[:32]}.safetensors"


@task(name="build_nullspace", cache_key_fn=file_cache_key(_projection_file), persist_result=True,
      result_serializer="json")
def build_nullspace(text_file: str, prototype_files: list[str], forget: list[str], retain: list[str],
                    nullspace: dict, synthesis: dict) -> dict:
    """Forget set F and retain set R from text embeddings and prototypes → the projection P (safetensors)."""
    params = {"text_file": text_file, "prototype_files": prototype_files, "forget": forget, "retain": retain,
              "nullspace": nullspace}
    path = _projection_file(params)
    if path.is_file():
        summary = load_projection(path)[1]["summary"]
    else:
        protos = load_prototypes(prototype_files, SynthesisConfig(**synthesis)) if prototype_files else None
        path, summary = build_projection_file(text_file, protos, parse_cells(forget), parse_cells(retain),
                                              NullspaceConfig(**nullspace), path)
    get_run_logger().info("projection %s: %s", path.name, summary)
    return {"path": str(path), "summary": summary}


@task(name="fold_projection")
def fold_projection(arch: str, checkpoint: str, sha256: str, projection_file: str, out: str,
                    metadata: dict[str, str]) -> dict:
    """Fold P into the image tower's last linear map → an ordinary checkpoint of the same architecture."""
    P, _ = load_projection(projection_file)
    digest_out = fold_checkpoint(loaded_model(arch, checkpoint, sha256), P, Path(out), metadata)
    get_run_logger().info("unlearned checkpoint %s: sha256 %s", out, digest_out)
    return {"path": out, "sha256": digest_out}
