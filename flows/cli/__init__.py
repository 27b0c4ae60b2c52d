"""The `clipforget` console command, one module per command group. Heavy imports happen inside each command.

- `local.py`: `toy render|train`, `eval`, `forget` (the method in this process, no Prefect)
- `runs.py`: `unlearn`, `govern`, `rebuild` (Prefect flows)
- `requests.py`: `request submit|list|show` (the ledger)
- `models.py`: `models list|show|promote|rollback`, `export`, `alerts install` (registry consumers, operators)
- `cache.py`: `cache info|prune` (the local cache)
"""

from __future__ import annotations

from flows.cli import cache, local, models, requests, runs  # noqa: F401  (each adds its commands to `app`)
from flows.cli.common import app

__all__ = ["app", "main"]


def main() -> None:  # pragma: no cover
    app(prog_name="clipforget")


if __name__ == "__main__":  # pragma: no cover
    main()
