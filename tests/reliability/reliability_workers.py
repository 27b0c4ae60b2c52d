"""Functions that run in separate processes (multiprocessing spawn imports them from here)."""

from __future__ import annotations


def append_at_once(location: str, request_id: str, barrier, env: dict) -> str:
    """Wait for every worker, then append one request to the ledger; returns the entry's hash."""
    import os

    os.environ.update(env)
    from clipforget.governance.ledger import Ledger

    ledger = Ledger(location)
    record = {"mode": "global", "classes": ["star"], "domains": [], "requested_by": request_id}
    barrier.wait(timeout=60)
    entry, appended = ledger.append(request_id, record)
    assert appended
    return entry.hash


def write_on_a_full_disk(root: str, fsize_limit: int | None = None) -> list[dict]:
    """Each writer of the project on a disk too small for it; what it raised and what it left behind.

    `fsize_limit`: where no small filesystem can be mounted, the process's file size limit (RLIMIT_FSIZE) plays the
    full disk (a write past it fails with EFBIG, as one past a full disk fails with ENOSPC)."""
    import json
    import os
    import resource
    import signal
    from pathlib import Path

    import torch

    if fsize_limit is not None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_limit, fsize_limit))
    from clipforget.governance.ledger import Ledger
    from clipforget.io.atomic import write_json
    from clipforget.io.checkpoints import TOY_WEIGHTS, save_checkpoint
    from clipforget.io.storage import fetch

    base = Path(root)
    writers = {
        "checkpoint (models.save_checkpoint)": lambda d: save_checkpoint({"w": torch.ones(512, 1024)}, d / "ck.safetensors"),
        "report (atomic.write_json)": lambda d: write_json(d / "report.json", {"cells": ["x" * 100] * 20_000}),
        "checkpoint fetch into the cache (storage.fetch)": lambda d: fetch(TOY_WEIGHTS, cache=d / "cache"),
        "ledger entry (Ledger.append)": lambda d: Ledger(d / "ledger").append(
            "dsr-1", {"mode": "global", "classes": ["star"], "domains": [], "reason": "r" * 2_000_000}),
    }
    out = []
    for name, write in writers.items():
        d = base / f"w{len(out)}"
        d.mkdir()
        try:
            write(d)
            error = None
        except OSError as e:
            error = f"{type(e).__name__} errno {e.errno}: {e.strerror}"
        except Exception as e:  # noqa: BLE001 - reported, not hidden
            error = f"{type(e).__name__}: {e}"
        files = sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())
        out.append({"writer": name, "error": error, "files": files})
        for p in sorted(d.rglob("*"), reverse=True):  # free the space for the next writer
            p.unlink() if p.is_file() else p.rmdir()
    print(json.dumps(out))
    os.sync()
    return out


def fill_bank_cells(cache: str, cells: list[str], steps: int, barrier, env: dict) -> dict:
    """Load the toy model and the cells' text targets, wait for every worker (no barrier: run alone), then fill
    the prototype bank under `cache` with those cells; returns which cells it synthesized and the bank files."""
    import os

    os.environ.update(env)
    import torch

    torch.set_num_threads(1)
    from clipforget.io.bank import PrototypeBank, synthesize_with_bank
    from clipforget.io.checkpoints import load_model
    from clipforget.method.projection import cell_text_embeddings, text_targets
    from clipforget.method.prompts import TemplateSet
    from clipforget.method.synthesis import SynthesisConfig
    from clipforget.steps import parse_cells

    loaded = load_model("toy")
    wanted = parse_cells(cells)
    targets = text_targets(cell_text_embeddings(loaded.model, loaded.tokenizer, TemplateSet(), wanted), wanted)
    config = SynthesisConfig(prototypes_per_cell=2, steps=steps, target_cosine=1.0, seed=0, precision="fp32")
    if barrier is not None:
        barrier.wait(timeout=120)
    paths, report = synthesize_with_bank(loaded.model, dict(zip(wanted, targets, strict=True)), wanted, config,
                                         loaded.sha256, PrototypeBank(os.path.join(cache, "prototypes")))
    return {"synthesized": report.synthesized, "paths": [str(p) for p in paths]}
