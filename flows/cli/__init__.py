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


_status = [1]  # the exit status `main` leaves for `_exit_without_teardown`


def _exit_status(code: object) -> int:
    """The status Python exits with for `SystemExit(code)`: None is 0, an int is itself, anything else (a message,
    which Python has already printed) 1."""
    if code is None:
        return 0
    return code if isinstance(code, int) else 1


def _exit_without_teardown() -> None:
    """The last exit hook of a command: every other one has run by now (Prefect stopped its temporary server,
    MLflow ended its run, logging flushed its handlers, temporary folders were removed: they all registered after
    this one, and exit hooks run last-registered first), so exit now instead of letting the interpreter tear down
    the modules of torch, MLflow and Prefect one object at a time, which took 2.8-3 s after every command that ran a
    flow (docs/BENCHMARKS.md). Files are written whole and closed where they are written; standard output and error
    are flushed here."""
    from flows.interrupt import flush_and_exit

    flush_and_exit(_status[0])


def main() -> None:  # pragma: no cover
    """The `clipforget` console command (and `python -m flows.cli`)."""
    import atexit

    atexit.register(_exit_without_teardown)  # before the command imports anything that registers its own hooks
    try:
        app(prog_name="clipforget")
    except SystemExit as e:
        _status[0] = _exit_status(e.code)
        raise
    except KeyboardInterrupt:
        _status[0] = 130
        raise
    _status[0] = 0


if __name__ == "__main__":  # pragma: no cover
    main()
