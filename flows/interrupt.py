"""SIGTERM and Ctrl-C for the commands that run flows: stop within seconds, say so, leave no child behind.

Without this a SIGTERM ends the Python process at once (no `atexit`), and the temporary Prefect server that the
first flow run of a command starts (a uvicorn child process) keeps running; Ctrl-C waits for the task that is
running to finish. Here the first signal prints one line, raises KeyboardInterrupt in the main thread (so Prefect
records the run as crashed and `finally` blocks run) and arms a watchdog; whatever is still running after
`GRACE_S` seconds (a synthesis step in a worker thread, a server that does not stop) is ended: every child process
of this command is terminated (then killed), and the process exits with 128 + the signal number. A second
signal skips the grace period. Files are only ever written whole (temp file + rename), so nothing half-written
stays behind, and a model is registered only after its run passed the gate: a stopped run registers nothing
that it had not registered before the signal.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
import time
from pathlib import Path

GRACE_S = 2.0
OWN_PROGRAMS = ("clipforget", "cli.py", "__main__.py")
_state: dict = {"command": None, "signal": None, "watcher": None}


def child_pids(pid: int | None = None) -> list[int]:
    """Every descendant process of `pid` (default: this process), children first; Linux /proc, else `ps`."""
    pid = os.getpid() if pid is None else pid
    parents: dict[int, int] = {}
    proc = Path("/proc")
    if proc.is_dir():
        for d in proc.iterdir():
            if d.name.isdigit():
                try:
                    stat = (d / "stat").read_text()
                except OSError:
                    continue
                # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ')'
                parents[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    else:  # pragma: no cover - macOS and other systems without /proc
        import subprocess

        out = subprocess.run(["ps", "-A", "-o", "pid=,ppid="], capture_output=True, text=True).stdout
        for line in out.splitlines():
            p, pp = line.split()
            parents[int(p)] = int(pp)
    found, frontier = [], [pid]
    while frontier:
        nxt = [p for p, pp in parents.items() if pp in frontier and p not in found]
        found += nxt
        frontier = nxt
    return found


def stop_children(timeout: float = 1.0) -> None:
    """Terminate every descendant process, wait up to `timeout` seconds, then kill what is left."""
    pids = child_pids()
    for p in pids:
        try:
            os.kill(p, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if _alive(p)]
        if not alive:
            break
        time.sleep(0.05)
    for p in pids + child_pids():
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for p in pids:
        try:  # reap our direct children, so none is left a zombie
            os.waitpid(p, os.WNOHANG)
        except ChildProcessError:
            pass


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False


def flush_and_exit(code: int) -> None:
    """Flush standard output and error, then end the process now with `code` (no exit hooks, no teardown)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001  (a closed pipe: nothing left to flush to)
            pass
    os._exit(code)


def hard_stop(code: int | None = None) -> None:
    """End every child process and exit now (no waiting for worker threads)."""
    sig = _state["signal"] or signal.SIGTERM
    stop_children()
    flush_and_exit(code if code is not None else 128 + int(sig))


def _on_signal(signum: int) -> None:
    """Runs in the watcher thread the moment a signal arrives, whatever the main thread is doing."""
    if _state["signal"] is not None:  # a second signal: no more grace
        hard_stop(128 + signum)
    _state["signal"] = signum
    name = signal.Signals(signum).name
    try:
        os.write(2, f"interrupted: {name} received; stopping {_state['command']} within {GRACE_S + 1:.0f} s (a run "
                    "stopped now registers nothing; a rerun reuses what was finished)\n".encode())
    except OSError:
        pass
    # registered now, after Prefect's own exit hook (which waits up to 5 s for its server): runs first
    atexit.register(finish_interrupted)
    timer = threading.Timer(GRACE_S, hard_stop, args=(128 + signum,))
    timer.daemon = True
    timer.start()


def _watch(fd: int) -> None:
    while True:
        try:
            data = os.read(fd, 1)
        except OSError:
            return
        if not data:
            return
        if data[0] in (signal.SIGTERM, signal.SIGINT):
            _on_signal(data[0])


def _handler(signum: int, frame: object) -> None:
    # the main thread's part: unwind (Prefect records the run as crashed, `finally` blocks run); the watcher
    # thread has already said so and armed the deadline. During a flow run Prefect's own SIGTERM handler raises
    # instead of this one; the watcher sees the signal either way (set_wakeup_fd).
    raise KeyboardInterrupt(signal.Signals(signum).name)


def install(command: str) -> None:
    """Handle SIGTERM and SIGINT for the rest of this command. Only in the `clipforget` process itself and its
    main thread: a program that calls the app in-process (a notebook, a test runner) keeps its own handlers."""
    if threading.current_thread() is not threading.main_thread() or Path(sys.argv[0]).name not in OWN_PROGRAMS:
        return
    _state["command"] = command
    if _state.get("watcher") is None:
        r, w = os.pipe()
        os.set_blocking(w, False)
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)  # the C-level handler writes each signal number here
        _state["watcher"] = threading.Thread(target=_watch, args=(r,), name="clipforget-signals", daemon=True)
        _state["watcher"].start()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _handler)


def interrupted() -> bool:
    return _state["signal"] is not None


def finish_interrupted() -> None:
    """At exit after a signal: say so, end the children and exit 128 + signal."""
    sig = _state["signal"] or signal.SIGINT
    try:
        os.write(2, f"stopped by {signal.Signals(sig).name}: {_state['command']} did not finish\n".encode())
    except OSError:
        pass
    hard_stop(128 + int(sig))
