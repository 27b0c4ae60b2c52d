"""The request ledger: an append-only, hash-chained record of accepted deletion requests.

One JSON file per entry, `<seq>-<request id>.json`, in a folder (S3 prefixes are the next step, issue 4).
Each entry carries the sha256 of the previous one, so a changed, removed or reordered entry breaks the
chain and `verify` names it. The head hash (the newest entry's) summarizes the whole history: a model
version tagged with it can be rebuilt from the base checkpoint and the ledger up to that head.
Request ids are unique; appending the same request again is a no-op, a different request under a used
id is refused.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipforget.atomic import write_text
from clipforget.grid import Cell, Grid, forget_cells

GENESIS = "0" * 64
_NAME = re.compile(r"^(\d{8})-(.+)\.json$")
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class LedgerError(RuntimeError):
    """The ledger is inconsistent (tampered, missing or reordered entries) or a request conflicts with it."""


def _digest(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class Entry:
    seq: int
    request_id: str
    request: dict[str, Any]
    prev_hash: str
    hash: str

    def body(self) -> dict[str, Any]:
        return {"seq": self.seq, "request_id": self.request_id, "request": self.request, "prev_hash": self.prev_hash}

    def to_dict(self) -> dict[str, Any]:
        return {**self.body(), "hash": self.hash}


class Ledger:
    """A folder of hash-chained entries."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _files(self) -> list[tuple[int, Path]]:
        if not self.root.is_dir():
            return []
        out = []
        for p in self.root.iterdir():
            m = _NAME.match(p.name)
            if m:
                out.append((int(m.group(1)), p))
        return sorted(out)

    def entries(self) -> list[Entry]:
        """All entries, verified: raises LedgerError naming the first broken link."""
        entries, prev = [], GENESIS
        for expected, (seq, path) in enumerate(self._files()):
            if seq != expected:
                raise LedgerError(f"ledger entry {expected} is missing (next file is {path.name})")
            try:
                data = json.loads(path.read_text())
                entry = Entry(data["seq"], data["request_id"], data["request"], data["prev_hash"], data["hash"])
            except (ValueError, KeyError, TypeError) as e:
                raise LedgerError(f"ledger entry {path.name} is unreadable: {e}") from e
            if entry.seq != seq or not path.name.endswith(f"-{entry.request_id}.json"):
                raise LedgerError(f"ledger entry {path.name} does not match its file name")
            if entry.prev_hash != prev:
                raise LedgerError(f"ledger entry {path.name} does not follow entry {seq - 1}: the chain is broken")
            if _digest(entry.body()) != entry.hash:
                raise LedgerError(f"ledger entry {path.name} was changed after it was written (hash mismatch)")
            entries.append(entry)
            prev = entry.hash
        return entries

    def verify(self) -> str:
        """The head hash of a consistent ledger (GENESIS when empty)."""
        entries = self.entries()
        return entries[-1].hash if entries else GENESIS

    def get(self, request_id: str) -> Entry | None:
        return next((e for e in self.entries() if e.request_id == request_id), None)

    def append(self, request_id: str, request: dict[str, Any]) -> tuple[Entry, bool]:
        """Append a request; returns (entry, appended). The same request again is a no-op."""
        if not _SAFE_ID.match(request_id):
            raise LedgerError(f"request id {request_id!r} must be 1-128 of letters, digits, '.', '_' or '-'")
        request = json.loads(json.dumps(request, sort_keys=True))  # canonical JSON types, as it will be read back
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one appender at a time: sequence numbers never collide
            entries = self.entries()
            for e in entries:
                if e.request_id == request_id:
                    if e.request != request:
                        raise LedgerError(f"request id {request_id!r} is already in the ledger with other content")
                    return e, False
            prev = entries[-1].hash if entries else GENESIS
            draft = Entry(len(entries), request_id, request, prev, "")
            entry = Entry(draft.seq, request_id, request, prev, _digest(draft.body()))
            write_text(self.root / f"{entry.seq:08d}-{request_id}.json",
                       json.dumps(entry.to_dict(), sort_keys=True, indent=1) + "\n")
            return entry, True


def cumulative_forget_cells(entries: Iterable[Entry], grid: Grid) -> list[Cell]:
    """The union of every entry's forget cells, in first-requested order (the cumulative request)."""
    cells: dict[Cell, None] = {}
    for e in entries:
        r = e.request
        for c in forget_cells(grid, r["mode"], r.get("classes", []), r.get("domains", [])):
            cells.setdefault(c, None)
    return list(cells)
