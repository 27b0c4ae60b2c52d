"""A real Prefect server, the shipped deployments and process workers, started once per module.

The server runs on its own port with its own PREFECT_HOME and SQLite database, apart from the
`prefect_test_harness` of the in-process flow tests: every subprocess gets PREFECT_API_URL explicitly, and
the test talks to the server through a client made for that URL. The workers see the session's S3 (moto) and
MLflow servers and its cache, so the prototype bank the flow tests filled is warm.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import testservers

REPO = Path(__file__).resolve().parents[3]
PREFECT = [sys.executable, "-m", "prefect"]



class Service:
    """A long-running subprocess in its own process group, its output in a log file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log: Path, cwd: Path) -> None:
        self.name, self.log_path = name, log
        self._log = open(log, "w")
        self.proc = subprocess.Popen(args, env=env, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def tail(self, chars: int = 4000) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return f"--- {self.name} log ({self.log_path}), last {chars} characters ---\n{text[-chars:]}"

    def stop(self) -> None:
        """Stop the process group, and any descendant that left it: a process worker starts each flow run in a
        session of its own, which must not outlive the test (e.g. after a timeout)."""
        stop_all([self])

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass


def stop_all(services: list[Service], grace: float = 10.0) -> None:
    """SIGTERM to every service's process group at once, then SIGKILL to whatever is left after `grace` seconds
    (in total, not per service: a worker that ignores SIGTERM held a module's teardown for 20 s each)."""
    strays = [pid for s in services for pid in _descendants(s.proc.pid)]
    running = [s for s in services if s.proc.poll() is None]
    for s in running:
        s._signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for s in running:
        try:
            s.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            s._signal(signal.SIGKILL)
            s.proc.wait(timeout=10)
    for pid in strays:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for s in services:
        s._log.close()


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc; empty elsewhere)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


class PrefectStack:
    """The server, the CLI against it, and the workers started on it."""

    def __init__(self, root: Path, url: str, env: dict[str, str], server: Service) -> None:
        self.root, self.url, self.env, self.server = root, url, env, server
        self.workers: list[Service] = []

    def cli(self, *args: str, timeout: float = 180) -> str:
        """Run a `prefect` command against this server; fail with its output when it fails."""
        out = subprocess.run([*PREFECT, *args], env=self.env, cwd=REPO, capture_output=True, text=True,
                             timeout=timeout)
        if out.returncode != 0:
            raise AssertionError(f"prefect {' '.join(args)} exited {out.returncode}:\n{out.stdout[-3000:]}\n"
                                 f"{out.stderr[-3000:]}")
        return out.stdout

    def start_worker(self, pool: str, **env: str) -> Service:
        worker = Service(f"worker-{pool}", [*PREFECT, "worker", "start", "--pool", pool, "--type", "process",
                                            "--name", f"test-{pool}", "--limit", "1"],
                         {**self.env, **env}, self.root / f"worker-{pool}.log", REPO)
        self.workers.append(worker)
        return worker

    def client(self):
        from prefect.client.orchestration import SyncPrefectClient

        return SyncPrefectClient(self.url)

    def run(self, deployment: str, parameters: dict, timeout: float):
        """Create a flow run of a deployment and wait for a final state (or the timeout); return the flow run."""
        with self.client() as client:
            dep = client.read_deployment_by_name(deployment)
            run = client.create_flow_run_from_deployment(dep.id, parameters=parameters)
            deadline = time.monotonic() + timeout
            while not (run.state and run.state.is_final()) and time.monotonic() < deadline:
                if dead := [w.name for w in self.workers if w.proc.poll() is not None]:
                    raise AssertionError(f"{dead} exited while {deployment} was running\n{self.logs()}")
                time.sleep(2)
                run = client.read_flow_run(run.id)
            return run

    def logs(self, chars: int = 6000) -> str:
        return "\n".join([*(w.tail(chars) for w in self.workers), self.server.tail(chars // 3)])

    def stop(self) -> None:
        stop_all([*self.workers, self.server])


def _wait_healthy(url: str, service: Service, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if json.loads(r.read()) is True:
                    return
        except (OSError, ValueError):
            pass
        if service.proc.poll() is not None or time.monotonic() > deadline:
            service.stop()
            raise RuntimeError(f"prefect server did not start\n{service.tail()}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def prefect_stack(pipeline_env, tmp_path_factory):
    """A `prefect server` subprocess on a free port (own PREFECT_HOME and SQLite database, scheduler off so the
    governance cron makes no runs here), with the `cpu` and `gpu` process work pools."""
    root = tmp_path_factory.mktemp("prefect-server")
    port = testservers.free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({
        "PREFECT_HOME": str(root / "home"),
        "PREFECT_API_URL": url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{root / 'prefect.db'}",
        "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
        "PREFECT_LOCAL_STORAGE_PATH": os.environ.get("PREFECT_LOCAL_STORAGE_PATH", str(root / "results")),
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "OMP_NUM_THREADS": "1",
    })
    server = Service("prefect-server", [*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                     env, root / "server.log", root)
    _wait_healthy(url, server)
    stack = PrefectStack(root, url, env, server)
    try:
        for pool in ("cpu", "gpu"):
            stack.cli("work-pool", "create", pool, "--type", "process")
        yield stack
    finally:
        stack.stop()

