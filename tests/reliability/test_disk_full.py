"""A full disk while writing a checkpoint, a report, a cached checkpoint or a ledger entry: a clean error, and no
file a reader could take for whole (no target file, no temp file left behind).

The disk is a 256 KiB tmpfs mounted for the test where the machine allows it (root); elsewhere the process's file
size limit (RLIMIT_FSIZE, 256 KiB) stands in for it. The table records which one ran."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
LIMIT = 256 * 1024


def _mount(path: Path) -> bool:
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={LIMIT}", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def test_writers_on_a_full_disk_leave_nothing_behind(tmp_path, checked):
    disk = tmp_path / "disk"
    mounted = _mount(disk)
    try:
        code = (f"import reliability_workers as w; w.write_on_a_full_disk({str(disk)!r}, "
                f"{None if mounted else LIMIT})")
        r = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, timeout=300)
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], check=True)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(results) == 4
    expected = errno.errorcode[errno.ENOSPC if mounted else errno.EFBIG]
    for res in results:
        assert res["error"] is not None and (expected in res["error"] or "No space" in res["error"] or
                                             "too large" in res["error"]), res
        assert res["files"] in ([], ["ledger/.lock"]), res  # the ledger's lock file is empty by design; nothing else
    checked(f"{'a 256 KiB tmpfs' if mounted else 'RLIMIT_FSIZE 256 KiB'}: " + "; ".join(
        f"{x['writer']}: {x['error'].split(':')[0]}, nothing left" for x in results), faults_survived=len(results))
