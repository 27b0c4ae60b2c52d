"""Starting the real servers the tests talk to: free ports, waiting for health, an `mlflow server` subprocess."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(url: str, alive: Callable[[], bool], log: Callable[[], str], what: str,
                       timeout: float = 120) -> None:
    """Poll `url` until it answers 200; RuntimeError with the log's tail when the process dies or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if not alive() or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start: {log()[-3000:]}")
        time.sleep(0.5)


@contextmanager
def mlflow_server(root: Path) -> Iterator[str]:
    """A real `mlflow server` subprocess (SQLite backend, proxied artifacts under `root`) on a free local port;
    MLFLOW_TRACKING_URI points at it while the context is open.

    Without MLflow's job execution (`MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false`): clipforget submits no server
    jobs, and the job runner and its seven huey consumer processes, each importing MLflow, cost about 3 CPU-minutes per
    server on a 2-core machine (profiled with py-spy, 2026-12-02)."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = root / "server.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, cwd=root,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(f"{url}/health", lambda: proc.poll() is None, log_path.read_text, "mlflow server")
        os.environ["MLFLOW_TRACKING_URI"] = url
        yield url
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
