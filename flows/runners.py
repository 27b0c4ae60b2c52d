"""Where tasks run: in-process by default, on a Ray cluster through prefect-ray when asked.

Environment:

- `CLIPFORGET_RAY_ADDRESS`: unset (default) → Prefect's in-process `ThreadPoolTaskRunner`. Set → a
  `prefect_ray.RayTaskRunner`: `local` starts a temporary local Ray instance for the flow run, `auto`
  joins the Ray cluster of this machine (or `RAY_ADDRESS`), `ray://head:10001` joins a remote cluster
  through Ray Client. Needs `pip install 'clipforget[ray]'`.
- `CLIPFORGET_GPUS_PER_TASK`: GPUs each synthesis task asks Ray for (fractions allowed, e.g. `0.5`).
  Unset: 1 when the Ray cluster has any GPU, else 0 — decided from the cluster's resources, not from the
  machine the flow runs on, which is often a CPU-only driver. Ignored by the in-process runner.
- `CLIPFORGET_CELLS_PER_TASK`: cells per synthesis task on Ray (default 8). The chunks depend on this number
  only, never on the runner, so every runner given it synthesizes exactly the same batches and gets the same bits.
  Unset, the in-process runner synthesizes the missing cells as one task and one batch (its slots refill as images
  finish, each cell banked as soon as it is done): chunks run one after another there, so they only cost time.
"""

from __future__ import annotations

import os
from typing import Any

RAY_ADDRESS_ENV = "CLIPFORGET_RAY_ADDRESS"
GPUS_ENV = "CLIPFORGET_GPUS_PER_TASK"
CELLS_ENV = "CLIPFORGET_CELLS_PER_TASK"
DEFAULT_CELLS_PER_TASK = 8

_MISSING_RAY = "Ray task runner needs prefect-ray: pip install 'clipforget[ray]'"


def _ray_runner_class() -> type:
    try:
        from prefect_ray import RayTaskRunner
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise ImportError(f"{RAY_ADDRESS_ENV} is set but prefect-ray is not installed. {_MISSING_RAY}") from e
    return RayTaskRunner


def task_runner(address: str | None = None, init_kwargs: dict[str, Any] | None = None) -> Any:
    """The task runner flows use: a `RayTaskRunner` when `address` (else `CLIPFORGET_RAY_ADDRESS`) is set,
    otherwise Prefect's in-process `ThreadPoolTaskRunner`. `address="local"` starts a local Ray instance."""
    address = address if address is not None else (os.environ.get(RAY_ADDRESS_ENV) or None)
    if address is None:
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner()
    return _ray_runner_class()(address=None if address == "local" else address, init_kwargs=init_kwargs)


def is_ray(runner: Any) -> bool:
    """Whether `runner` is a prefect-ray `RayTaskRunner` (False, without importing Ray, when it cannot be)."""
    if runner is None or type(runner).__module__.split(".")[0] != "prefect_ray":
        return False
    return isinstance(runner, _ray_runner_class())


def cells_per_task_set() -> bool:
    """Whether `CLIPFORGET_CELLS_PER_TASK` is set (then every runner chunks by it)."""
    return bool(os.environ.get(CELLS_ENV))


def cells_per_task() -> int:
    """`CLIPFORGET_CELLS_PER_TASK`, default 8."""
    value = os.environ.get(CELLS_ENV)
    n = int(value) if value else DEFAULT_CELLS_PER_TASK
    if n < 1:
        raise ValueError(f"{CELLS_ENV} must be at least 1, got {n}")
    return n


def gpus_per_task(cluster_gpus: float | None = None) -> float:
    """`CLIPFORGET_GPUS_PER_TASK`; unset: 1 when the cluster has GPUs (`cluster_gpus` > 0), else 0."""
    value = os.environ.get(GPUS_ENV)
    if value:
        gpus = float(value)
        if gpus < 0:
            raise ValueError(f"{GPUS_ENV} must not be negative, got {value}")
        return gpus
    return 1.0 if cluster_gpus else 0.0


def ray_cluster_gpus() -> float:
    """GPUs of the Ray cluster this process is connected to (0 when not connected)."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0.0
