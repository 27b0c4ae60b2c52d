"""The request ledger: an append-only, hash-chained record of accepted deletion requests.

One JSON object per entry, `<seq>.json` (8 digits), in a local folder or under an S3 prefix
(`s3://bucket/prefix/`). Each entry carries the sha256 of the previous one, so a changed, removed or
reordered entry breaks the chain and `verify` names it. The head hash (the newest entry's) summarizes the
whole history: a model version tagged with it can be rebuilt from the base checkpoint and the ledger up to
that head. Request ids are unique; appending the same request again is a no-op, a different request under
a used id is refused. Appends never overwrite: a folder creates each entry exclusively (hard link of a
whole temp file), S3 with a conditional write (`If-None-Match: *`), so two writers racing for the same
sequence number cannot both win; the loser re-reads and appends after the winner.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipforget.governance.request import ID_PATTERN
from clipforget.io.storage import Location, is_transient, s3_client, with_retries
from clipforget.method.grid import Cell, Grid, forget_cells

GENESIS = "0" * 64
_NAME = re.compile(r"^(\d{8})\.json$")
_SAFE_ID = re.compile(ID_PATTERN)


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


class FolderStore:
    """Entries as files in a local folder; an entry appears whole (temp file + hard link) or not at all."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def __str__(self) -> str:
        return str(self.root)

    def names(self) -> list[str]:
        return [p.name for p in self.root.iterdir()] if self.root.is_dir() else []

    def read(self, name: str) -> str:
        return (self.root / name).read_text()

    def create(self, name: str, text: str) -> bool:
        """Write `name` unless it exists; False when another writer got there first."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, self.root / name)
            except FileExistsError:
                return False
            return True
        finally:
            os.unlink(tmp)

    @contextmanager
    def lock(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one appender per machine at a time; create() guards the rest
            yield


class S3Store:
    """Entries as objects under an S3 prefix; conditional writes (If-None-Match: *) never overwrite."""

    def __init__(self, bucket: str, prefix: str) -> None:
        self.bucket, self.prefix = bucket, prefix if not prefix or prefix.endswith("/") else prefix + "/"
        self._client: Any = None

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = s3_client()
        return self._client

    def names(self) -> list[str]:
        def run() -> list[str]:
            out = []
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix):
                out += [o["Key"][len(self.prefix):] for o in page.get("Contents", [])]
            return [n for n in out if "/" not in n]

        return with_retries(run, f"{self}: list")

    def read(self, name: str) -> str:
        return with_retries(lambda: self.client.get_object(Bucket=self.bucket, Key=self.prefix + name)["Body"].read(),
                            f"{self}{name}: read").decode()

    def create(self, name: str, text: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.put_object(Bucket=self.bucket, Key=self.prefix + name, Body=text.encode(),
                                   ContentType="application/json", IfNoneMatch="*")
            return True
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409"):
                return False
            if is_transient(e):
                raise LedgerError(f"{self}: could not write entry {name}: {code}; nothing was appended") from e
            raise

    @contextmanager
    def lock(self) -> Iterator[None]:
        yield  # conditional writes serialize appenders


class Ledger:
    """Hash-chained entries in a folder or under an S3 prefix (`s3://bucket/prefix/`)."""

    def __init__(self, root: str | Path) -> None:
        loc = Location.parse(root)
        self.store: FolderStore | S3Store = (S3Store(loc.bucket, loc.key) if loc.scheme == "s3"
                                             else FolderStore(Path(loc.key)))
        self.location = str(self.store)

    def _files(self) -> list[tuple[int, str]]:
        out = []
        for name in self.store.names():
            m = _NAME.match(name)
            if m:
                out.append((int(m.group(1)), name))
        return sorted(out)

    def entries(self) -> list[Entry]:
        """All entries, verified: raises LedgerError naming the first broken link."""
        entries, prev = [], GENESIS
        for expected, (seq, name) in enumerate(self._files()):
            if seq != expected:
                raise LedgerError(f"ledger {self.location}: entry {expected} is missing (next entry is {name})")
            try:
                data = json.loads(self.store.read(name))
                entry = Entry(data["seq"], data["request_id"], data["request"], data["prev_hash"], data["hash"])
            except (ValueError, KeyError, TypeError) as e:
                raise LedgerError(f"ledger {self.location}: entry {name} is unreadable: {e}") from e
            if entry.seq != seq or name != f"{seq:08d}.json":
                raise LedgerError(f"ledger {self.location}: entry {name} does not match its name")
            if entry.prev_hash != prev:
                raise LedgerError(f"ledger {self.location}: entry {name} does not follow entry {seq - 1}: "
                                  "the chain is broken")
            if _digest(entry.body()) != entry.hash:
                raise LedgerError(f"ledger {self.location}: entry {name} was changed after it was written "
                                  "(hash mismatch)")
            entries.append(entry)
            prev = entry.hash
        return entries

    def verify(self) -> str:
        """The head hash of a consistent ledger (GENESIS when empty)."""
        entries = self.entries()
        return entries[-1].hash if entries else GENESIS

    def up_to(self, head: str) -> list[Entry]:
        """The entries up to and including the one whose hash is `head` (none for GENESIS)."""
        entries = self.entries()
        if head == GENESIS:
            return []
        for i, e in enumerate(entries):
            if e.hash == head:
                return entries[: i + 1]
        raise LedgerError(f"ledger {self.location}: no entry has hash {head[:16]}…: entries were removed or changed "
                          "since a model was built from it")

    def resolve(self, head: str) -> str:
        """The full hash of the entry whose hash starts with `head` (as `request list` prints 12 characters)."""
        if head == GENESIS:
            return head
        found = [e.hash for e in self.entries() if e.hash.startswith(head.lower())] if len(head) >= 6 else []
        if len(found) != 1:
            raise LedgerError(f"ledger {self.location}: {'no' if not found else 'more than one'} entry hash starts with "
                              f"{head!r}" + (" (give at least 6 characters)" if len(head) < 6 else ""))
        return found[0]

    def get(self, request_id: str) -> Entry | None:
        return next((e for e in self.entries() if e.request_id == request_id), None)

    def append(self, request_id: str, request: dict[str, Any]) -> tuple[Entry, bool]:
        """Append a request; returns (entry, appended). The same request again is a no-op."""
        if not _SAFE_ID.match(request_id):
            raise LedgerError(f"request id {request_id!r} must be 1-128 of letters, digits, '.', '_' or '-'")
        request = json.loads(json.dumps(request, sort_keys=True))  # canonical JSON types, as it will be read back
        with self.store.lock():
            for _ in range(20):
                entries = self.entries()
                for e in entries:
                    if e.request_id == request_id:
                        if e.request != request:
                            raise LedgerError(f"request id {request_id!r} is already in the ledger with other content")
                        return e, False
                prev = entries[-1].hash if entries else GENESIS
                draft = Entry(len(entries), request_id, request, prev, "")
                entry = Entry(draft.seq, request_id, request, prev, _digest(draft.body()))
                if self.store.create(f"{entry.seq:08d}.json",
                                     json.dumps(entry.to_dict(), sort_keys=True, indent=1) + "\n"):
                    return entry, True
                # another writer took sequence number `seq` meanwhile: re-read and append after it
            raise LedgerError(f"ledger {self.location}: could not append {request_id!r}: too much contention")


def cumulative_forget_cells(entries: Iterable[Entry], grid: Grid) -> list[Cell]:
    """The union of every entry's forget cells, in first-requested order (the cumulative request)."""
    cells: dict[Cell, None] = {}
    for e in entries:
        r = e.request
        for c in forget_cells(grid, r["mode"], r.get("classes", []), r.get("domains", [])):
            cells.setdefault(c, None)
    return list(cells)
