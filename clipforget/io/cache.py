"""What the local cache holds, and pruning what has not been used for a while.

Every request adds to the cache (`CLIPFORGET_CACHE`, default `~/.cache/clipforget`): the built checkpoint and
report of each request (`runs/`, one model per request), prototypes per checkpoint and synthesis settings, fetched
checkpoints and mirrored image folders. Nothing there is the only copy of anything: a registered model lives in the
MLflow registry, and everything else is rebuilt or fetched again when missing. An entry's age is the last time it
was used: a cache hit refreshes it (`touch`).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

# section → (what it holds, the depth below the section at which one entry lives: a file or a folder)
SECTIONS: dict[str, tuple[str, int]] = {
    "runs": ("built checkpoints, pictures and reports, one folder per request", 1),
    "prototypes": ("the prototype bank: synthesized prototypes per checkpoint, cell and settings", 2),
    "fit": ("embedded fit images per checkpoint and image set", 2),
    "features": ("the base model's embeddings of held-out prototypes, per checkpoint and bank file", 2),
    "projections": ("fitted projections", 1),
    "text": ("prompt embeddings per checkpoint", 1),
    "precision": ("synthesis precision measured per checkpoint and machine", 1),
    "pictures": ("prototype strips for the model pictures", 3),
    "governance": ("registered weights downloaded for audits", 2),
    "blobs": ("fetched checkpoints, content-addressed", 2),
    "trees": ("mirrored S3 image folders", 1),
}


@dataclass(frozen=True)
class Entry:
    section: str
    path: Path
    bytes: int
    last_used: float  # seconds since the epoch: the newest modification time of the entry's files


def touch(path: str | Path) -> None:
    """Mark a cache entry as used now (a hit); a read-only cache is left as it is."""
    with suppress(OSError):
        os.utime(path, None)


def _files(path: Path) -> Iterator[Path]:
    if path.is_symlink() or path.is_file():
        yield path
    elif path.is_dir():
        for sub in path.rglob("*"):
            if sub.is_file() and not sub.is_symlink():
                yield sub


def _entry(section: str, path: Path) -> Entry:
    size, newest = 0, 0.0
    for f in _files(path):
        try:
            st = f.lstat()
        except OSError:  # removed while we looked
            continue
        size += st.st_size
        newest = max(newest, st.st_mtime)
    if not newest:  # an empty folder: its own time
        with suppress(OSError):
            newest = path.lstat().st_mtime
    return Entry(section, path, size, newest)


def entries(root: str | Path, sections: Iterable[str] | None = None) -> list[Entry]:
    """The cache's entries, section by section (unknown sections are an error)."""
    root = Path(root)
    chosen = list(SECTIONS) if sections is None else list(sections)
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown cache section(s) {', '.join(unknown)}; expected some of {', '.join(SECTIONS)}")
    out = []
    for section in chosen:
        base = root / section
        if not base.is_dir():
            continue
        level = [base]
        for _ in range(SECTIONS[section][1]):
            level = [p for d in level if d.is_dir() and not d.is_symlink() for p in sorted(d.iterdir())]
        out += [_entry(section, p) for p in level]
    return out


def usage(root: str | Path) -> dict[str, dict]:
    """Per section: entries, bytes, and the oldest and newest last use."""
    summary: dict[str, dict] = {s: {"entries": 0, "bytes": 0, "oldest": None, "newest": None} for s in SECTIONS}
    for e in entries(root):
        s = summary[e.section]
        s["entries"] += 1
        s["bytes"] += e.bytes
        s["oldest"] = e.last_used if s["oldest"] is None else min(s["oldest"], e.last_used)
        s["newest"] = e.last_used if s["newest"] is None else max(s["newest"], e.last_used)
    return summary


def prune(root: str | Path, older_than_s: float, sections: Iterable[str] | None = None, dry_run: bool = False,
          now: float | None = None) -> list[Entry]:
    """Remove the entries not used for `older_than_s` seconds; returns them. With `dry_run`, removes nothing.

    An entry is removed whole (a run's folder, a bank file), so no reader finds half of one; a file being read
    stays readable to the process that opened it."""
    if older_than_s < 0:
        raise ValueError("older_than_s must be at least 0")
    cutoff = (time.time() if now is None else now) - older_than_s
    stale = [e for e in entries(root, sections) if e.last_used < cutoff]
    if not dry_run:
        for e in stale:
            if e.path.is_dir() and not e.path.is_symlink():
                shutil.rmtree(e.path, ignore_errors=True)
            else:
                e.path.unlink(missing_ok=True)
    return stale
