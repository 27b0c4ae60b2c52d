"""clipforget: training- and data-free unlearning for CLIP models (arXiv 2512.14113).

The public API for notebooks and scripts (docs/DESIGN.md describes the method and the layers)::

    import clipforget as cf

    model = cf.load_model("toy")                                   # or "ViT-B-32", checkpoint=..., pretrained=...
    result = cf.forget(model, mode="global", classes=["star"], out="runs/no-star.safetensors")
    print(result.report["passed"], result.report["metrics"])
    unlearned = cf.load_model("toy", checkpoint="runs/no-star.safetensors")
    print(cf.evaluate(unlearned, data="data/toy-test").accuracy)
    cf.submit({"request_id": "dsr-1", "mode": "global", "classes": ["heart"]}, ledger="ledger")

Names are imported on first use, so `import clipforget` stays cheap.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

# MKL's AVX-512 single-precision GEMM picks its kernel by matrix size on some CPUs (seen on an AMX Xeon): a cell's fp32
# prototypes then depend on what else shared its batch (about 1e-3 apart after 5 steps), and a bank filled in one
# batch would not match one filled cell by cell. MKL's reproducible AVX2 code path keeps them the same bits (measured:
# the toy model's fp32 synthesis loop 4% slower there). It takes effect only if no MKL call ran before this import;
# a value already set is kept (docs/PIPELINE.md, "Caches")
os.environ.setdefault("MKL_CBWR", "AVX2")

_EXPORTS = {
    "load_model": "clipforget.io.checkpoints",
    "LoadedModel": "clipforget.io.checkpoints",
    "forget": "clipforget.api",
    "evaluate": "clipforget.api",
    "submit": "clipforget.api",
    "default_bank": "clipforget.api",
    "synthesis_for": "clipforget.api",
    "ForgetResult": "clipforget.runner",
    "EvalReport": "clipforget.method.evaluate",
    "Grid": "clipforget.method.grid",
    "resolve_grid": "clipforget.method.grid",
    "SynthesisConfig": "clipforget.method.synthesis",
    "NullspaceConfig": "clipforget.method.projection",
    "Thresholds": "clipforget.gate.verdict",
    "Verdict": "clipforget.gate.verdict",
    "DeletionRequest": "clipforget.governance.request",
    "ModelPolicy": "clipforget.governance.request",
    "Ledger": "clipforget.governance.ledger",
    "PrototypeBank": "clipforget.io.bank",
}

__all__ = [
    "DeletionRequest",
    "EvalReport",
    "ForgetResult",
    "Grid",
    "Ledger",
    "LoadedModel",
    "ModelPolicy",
    "NullspaceConfig",
    "PrototypeBank",
    "SynthesisConfig",
    "Thresholds",
    "Verdict",
    "default_bank",
    "evaluate",
    "forget",
    "load_model",
    "resolve_grid",
    "submit",
    "synthesis_for",
]

if TYPE_CHECKING:
    from clipforget.api import default_bank, evaluate, forget, submit, synthesis_for
    from clipforget.gate.verdict import Thresholds, Verdict
    from clipforget.governance.ledger import Ledger
    from clipforget.governance.request import DeletionRequest, ModelPolicy
    from clipforget.io.bank import PrototypeBank
    from clipforget.io.checkpoints import LoadedModel, load_model
    from clipforget.method.evaluate import EvalReport
    from clipforget.method.grid import Grid, resolve_grid
    from clipforget.method.projection import NullspaceConfig
    from clipforget.method.synthesis import SynthesisConfig
    from clipforget.runner import ForgetResult


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'clipforget' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
