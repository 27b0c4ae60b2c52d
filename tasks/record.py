"""The deletion-request ledger as Prefect tasks: read (verified) and append."""

from __future__ import annotations

import os

from prefect import get_run_logger, task

from clipforget.governance.ledger import Entry, Ledger
from tasks.common import retry_if_transient

DEFAULT_LEDGER = "ledger"


def ledger_location(ledger: str | None) -> str:
    """The ledger to use: the argument, else `CLIPFORGET_LEDGER`, else `./ledger`."""
    return ledger or os.environ.get("CLIPFORGET_LEDGER") or DEFAULT_LEDGER


@task(name="read_ledger", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_if_transient)
def read_ledger(location: str) -> list[dict]:
    """Every entry, after the hash chain was verified (LedgerError names a changed or missing entry)."""
    entries = Ledger(location).entries()
    get_run_logger().info("ledger %s: %d entries, head %s", location, len(entries),
                          entries[-1].hash[:16] if entries else "(empty)")
    return [e.to_dict() for e in entries]


@task(name="append_request")
def append_request(location: str, request_id: str, record: dict) -> dict:
    """Append one accepted request (a no-op for an id already there with the same content)."""
    entry, appended = Ledger(location).append(request_id, record)
    get_run_logger().info("ledger %s: %s %s as entry %d (hash %s)", location,
                          "appended" if appended else "already holds", request_id, entry.seq, entry.hash[:16])
    return {**entry.to_dict(), "appended": appended}


def entry_of(d: dict) -> Entry:
    return Entry(d["seq"], d["request_id"], d["request"], d["prev_hash"], d["hash"])
