"""The pipeline tests' prototype cache and pipeline fixture. The real components they run against (S3 over HTTP,
an `mlflow server` subprocess, Prefect's test harness) are session fixtures of tests/conftest.py, shared with
tests/reliability so that one pytest process (or xdist worker) only ever has one set in its environment."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def banked_retain_cells(pipeline_env, toy, prototype_bank):
    """The prototype bank as an earlier request would have left it: every cell but `star`'s.

    The core's session fixture synthesized all 40 cells with the default settings (those of the requests
    below), seeded per (seed, cell, index); storing 36 of them is what a request that forgot another class
    would have stored. A `star` request then synthesizes its 4 cells only, and the next one none.
    """
    from clipforget.io.bank import PrototypeBank
    from clipforget.method.synthesis import Prototypes

    keep = [i for i, c in enumerate(prototype_bank.cells) if c.cls != "star"]
    retained = Prototypes(prototype_bank.embeddings[keep], [prototype_bank.cells[i] for i in keep],
                          prototype_bank.cosines[keep], prototype_bank.steps_used[keep],
                          prototype_bank.seconds * len(keep) / len(prototype_bank.cells), prototype_bank.config)
    return PrototypeBank(pipeline_env / "cache" / "prototypes").put(toy.sha256, retained)


@pytest.fixture(scope="module")
def own_cache(pipeline_env, banked_retain_cells, module_tmp):
    """A factory of fresh CLIPFORGET_CACHE folders, each holding the 36 non-`star` cells of the bank.

    Test modules that synthesize `star` (the whole grid is every build's retain set) work in a cache of their
    own: the flow tests' first request expects `star`'s cells unsynthesized, whichever order the tests run in.
    """
    import shutil

    def make(name: str) -> Path:
        src, dst = pipeline_env / "cache", module_tmp(name)
        for path in banked_retain_cells:
            target = dst / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
        return dst

    return make


@pytest.fixture(scope="session")
def pipeline(s3, mlflow_server, prefect_harness, banked_retain_cells):
    """Everything the flow talks to, started."""
    return {"s3": s3, "mlflow": mlflow_server}
