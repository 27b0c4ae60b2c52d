"""Steps 2-5 of the method as Prefect tasks: text embeddings, prototypes, projection, fold.

Thin wrappers over `clipforget.steps`: they take and return paths, digests and small dicts, never models.
One exception: `synthesize_chunk` returns its prototypes' tensors, because on Ray it runs on workers that
need not share the caller's disk (`flows.fanout.fill_bank` banks them on the caller's side). Which runner
runs them, and how the cells are split, is the flows' business (`flows/fanout.py`, `flows/runners.py`).
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from clipforget.io.bank import load_prototypes
from clipforget.io.cache import touch
from clipforget.method.projection import NullspaceConfig
from clipforget.method.prompts import TemplateSet
from clipforget.method.synthesis import SynthesisConfig, format_progress, synthesize
from clipforget.steps import (
    build_projection_file,
    digest,
    fold_checkpoint,
    load_projection,
    parse_cells,
    text_path,
    write_text_embeddings,
)
from tasks.common import file_cache_key, loaded_model, work_root


def _text_file(p: dict) -> Path:
    return text_path(work_root(), p["sha256"], parse_cells(p["cells"]), TemplateSet())


@task(name="generate_prompts", cache_key_fn=file_cache_key(_text_file), persist_result=True, result_serializer="json")
def generate_prompts(arch: str, checkpoint: str, sha256: str, cells: list[str]) -> str:
    """Domain-aware prompts per cell → their normalized text embeddings (a safetensors file)."""
    path = _text_file({"sha256": sha256, "cells": cells})
    if not path.is_file():
        write_text_embeddings(loaded_model(arch, checkpoint, sha256), parse_cells(cells), TemplateSet(), path)
    else:
        touch(path)
    get_run_logger().info("text embeddings of %d cells at %s", len(cells), path)
    return str(path)


def precision_report(config: SynthesisConfig) -> dict:
    """The precision synthesis runs at here (auto resolved) and what decided it, for the report."""
    from clipforget.io.checkpoints import pick_device
    from clipforget.method.synthesis import hardware_summary

    device = pick_device()
    return {"precision": config.resolved(device).precision, "hardware": hardware_summary(device)}


def _progress_logger(every_s: float = 5.0):
    """Synthesis progress as log lines: the first at once, then at least every `every_s` seconds, and the last."""
    logger = get_run_logger()
    last = [float("-inf")]

    def log(p: dict) -> None:
        now = time.monotonic()
        if now - last[0] >= every_s or p["done"] == p["total"]:
            last[0] = now
            logger.info("synthesis (%s): %s", p.get("precision", "?"), format_progress(p))
    return log


def _local_checkpoint(checkpoint: str, sha256: str, checkpoint_uri: str | None = None) -> str:
    """The checkpoint as a file on this machine: the path itself, else its URI (`checkpoint_uri`, or
    `checkpoint` when it is one) fetched into this machine's cache and verified against `sha256`."""
    if Path(checkpoint).is_file():
        return checkpoint
    uri = next((u for u in (checkpoint_uri, checkpoint) if u and "://" in u), None)
    if uri is not None:
        from clipforget.io.storage import fetch

        return str(fetch(uri, sha256).path)
    raise FileNotFoundError(f"checkpoint {checkpoint} is not readable on {socket.gethostname()}: a synthesis worker "
                            "needs the checkpoint at the same path (a shared volume) or an s3:// / file:// URI")


def _synthesis_worker(arch: str, checkpoint: str, sha256: str, checkpoint_uri: str | None, synthesis: dict,
                      cells: list[str], what: str = "") -> tuple[SynthesisConfig, torch.nn.Module, dict]:
    """A synthesis task's settings, model and where it runs ({host, pid, device}), logged as the task starts."""
    config = SynthesisConfig(**synthesis)
    model = loaded_model(arch, _local_checkpoint(checkpoint, sha256, checkpoint_uri), sha256).model
    where = {"host": socket.gethostname(), "pid": os.getpid(), "device": str(next(model.parameters()).device)}
    what = what or f"{len(cells)} cells x {config.prototypes_per_cell} prototypes"
    get_run_logger().info("synthesizing %s on %s (%s, pid %d)", what, where["device"], where["host"], where["pid"])
    return config, model, where


@task(name="synthesize_into_bank", tags=["gpu"], cache_policy=NONE, persist_result=False)
def synthesize_into_bank(arch: str, checkpoint: str, sha256: str, blocks: list[dict], targets: dict[str, torch.Tensor],
                         checkpoint_uri: str | None = None) -> dict:
    """In-process synthesis of `blocks` as one batch whose slots refill as images finish, each cell put into this
    process's prototype bank as soon as its prototypes are done (an interrupted run keeps the finished cells).

    `blocks`: [{synthesis (settings), cells, with_images}], blocks that differ in the settings of each image only
    (`clipforget.io.bank.synthesize_blocks_with_bank`): a set of cells, the held-out blocks of a request, or a
    request's projection prototypes and its held-out blocks together. `targets`: the text target of every cell named.
    Returns {cells (each block's, in order), seconds, host, pid, device}."""
    from clipforget.io.bank import PrototypeBank, synthesize_blocks_with_bank

    cells = [c for b in blocks for c in b["cells"]]
    configs = [(SynthesisConfig(**b["synthesis"]), parse_cells(b["cells"])) for b in blocks]
    images = sum(cfg.prototypes_per_cell * len(block_cells) for cfg, block_cells in configs)
    what = (f"{len(cells)} cell blocks of {len(blocks)} settings ({images} images) as one batch" if len(blocks) > 1
            else f"{len(cells)} cells x {configs[0][0].prototypes_per_cell} prototypes as one batch")
    _, model, where = _synthesis_worker(arch, checkpoint, sha256, checkpoint_uri, blocks[0]["synthesis"], cells, what)
    targets_of = {c: targets[str(c)] for _, block_cells in configs for c in block_cells}
    _, report = synthesize_blocks_with_bank(model, targets_of, configs, sha256, PrototypeBank(work_root() / "prototypes"),
                                            [bool(b.get("with_images")) for b in blocks], _progress_logger())
    return {"cells": cells, "seconds": report.seconds, **where}


@task(name="synthesize_chunk", tags=["gpu"], cache_policy=NONE, persist_result=False)
def synthesize_chunk(arch: str, checkpoint: str, sha256: str, cells: list[str], targets: torch.Tensor,
                     synthesis: dict, with_images: bool = False, checkpoint_uri: str | None = None) -> dict:
    """Prototypes of a chunk of cells, returned as data (not bank paths: a Ray worker on another machine
    does not share the caller's disk; the caller puts them into its bank).

    `targets` [len(cells), d] are the cells' text targets. Returns {cells, embeddings, cosines, steps_used,
    images (uint8, or None), seconds, host, pid, device}.
    """
    config, model, where = _synthesis_worker(arch, checkpoint, sha256, checkpoint_uri, synthesis, cells)
    protos = synthesize(model, targets, parse_cells(cells), config, _progress_logger(),
                               return_images=with_images)
    return {"cells": list(cells), "embeddings": protos.embeddings, "cosines": protos.cosines,
            "steps_used": protos.steps_used, "images": protos.images, "seconds": protos.seconds, **where}


@task(name="embed_fit_images")
def embed_fit_images(arch: str, checkpoint: str, sha256: str, text_file: str, data_path: str, grid: dict,
                     synthesis: dict) -> dict:
    """Labelled images of every cell → their embeddings, one file per cell in the prototype bank's layout: the
    projection's fit set in place of prototypes. The files are keyed by the checkpoint and the images' bytes, so
    a projection cached on them is the projection of exactly these images."""
    import hashlib

    from safetensors.torch import save_file

    from clipforget.method.data import list_labelled_images
    from clipforget.method.evaluate import LabelledImages
    from clipforget.method.grid import Grid
    from clipforget.runner import image_prototypes
    from clipforget.steps import load_text

    g = Grid.from_dict(grid)
    items = list_labelled_images(data_path, g)  # fetch_eval_data checked every image already
    h = hashlib.sha256()
    for path, cell in sorted(items, key=lambda it: (str(it[1]), it[0].name)):
        h.update(f"{cell}|{hashlib.sha256(path.read_bytes()).hexdigest()}\n".encode())
    key = h.hexdigest()
    out_dir = work_root() / "fit" / sha256 / key[:24]
    paths = [out_dir / f"{i:05d}.safetensors" for i in range(len(g.cells))]
    if not all(p.is_file() for p in paths):
        loaded = loaded_model(arch, checkpoint, sha256)
        images = LabelledImages.from_folder(data_path, loaded.preprocess, g)
        protos = image_prototypes(loaded, g, images, load_text(text_file), SynthesisConfig(**synthesis))
        out_dir.mkdir(parents=True, exist_ok=True)
        for path, cell in zip(paths, g.cells, strict=True):
            idx = [i for i, c in enumerate(protos.cells) if c == cell]
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            save_file({"embeddings": protos.embeddings[idx].contiguous(), "cosines": protos.cosines[idx].contiguous(),
                       "steps_used": protos.steps_used[idx].contiguous()}, str(tmp),
                      metadata={"cell": str(cell), "source": "images", "images_digest": key})
            os.replace(tmp, path)  # a reader never sees a half-written file
    else:
        for path in paths:
            touch(path)
    get_run_logger().info("fit set: %d labelled images of %d cells from %s (digest %s)", len(items), len(g.cells),
                          data_path, key[:12])
    return {"paths": [str(p) for p in paths], "images": len(items), "digest": key}


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
        touch(path)
        summary = load_projection(path)[1]["summary"]
    else:
        protos = load_prototypes(prototype_files, SynthesisConfig(**synthesis)) if prototype_files else None
        path, summary = build_projection_file(text_file, protos, parse_cells(forget), parse_cells(retain),
                                              NullspaceConfig(**nullspace), path)
    get_run_logger().info("projection %s: %s", path.name, summary)
    return {"path": str(path), "summary": summary}


@task(name="fold_into_checkpoint")
def fold_into_checkpoint(arch: str, checkpoint: str, sha256: str, projection_file: str, out: str,
                    metadata: dict[str, str]) -> dict:
    """Fold P into the image tower's last linear map → an ordinary checkpoint of the same architecture."""
    P, _ = load_projection(projection_file)
    digest_out = fold_checkpoint(loaded_model(arch, checkpoint, sha256), P, Path(out), metadata)
    get_run_logger().info("unlearned checkpoint %s: sha256 %s", out, digest_out)
    return {"path": out, "sha256": digest_out}
