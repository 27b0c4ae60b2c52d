"""What every task shares: where run files live, cache keys over files, retry conditions."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clipforget.io.storage import TransientError, cache_root, is_transient


def work_root() -> Path:
    """Files the pipeline writes (text embeddings, prototype bank, projections, checkpoints, reports)."""
    return cache_root()


def run_logger(name: str) -> Any:
    """The Prefect run's logger inside a flow or task run, else the logger `name` (a caller outside any run)."""
    from prefect.context import FlowRunContext, TaskRunContext
    from prefect.logging import get_logger, get_run_logger

    return get_run_logger() if FlowRunContext.get() or TaskRunContext.get() else get_logger(name)


def retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry network trouble and server errors; a checksum mismatch or a missing object fails at once."""
    exc = getattr(state, "data", None)
    return isinstance(exc, TransientError) or (isinstance(exc, BaseException) and is_transient(exc))


def file_cache_key(output: Callable[[dict], Path]) -> Callable[[Any, dict], str | None]:
    """A Prefect cache_key_fn keyed by the output file a task writes (itself named by its inputs' digests).

    The key is the file's absolute path, so a cached result always names that very file; and there is no
    key (the task runs) when the file is gone, so a cached result never points at nothing."""

    def key(context: Any, parameters: dict) -> str | None:
        path = output(parameters).resolve()
        return hashlib.sha256(str(path).encode()).hexdigest() if path.is_file() else None

    return key


_LOADED: dict[tuple[str, str, str], Any] = {}


def loaded_model(arch: str, checkpoint: str, sha256: str) -> Any:
    """The model of a fetched checkpoint, loaded once per process (tasks of one run share it, read-only)."""
    from clipforget.io.checkpoints import load_model

    key = (arch, checkpoint, sha256)
    if key not in _LOADED:
        _LOADED.clear()  # keep one model alive, not one per checkpoint ever seen
        _LOADED[key] = load_model(arch, checkpoint)
    return _LOADED[key]
