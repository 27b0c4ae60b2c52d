"""Which task runner the flows get, and the synthesis fan-out settings, from the environment."""

from __future__ import annotations

import sys

import pytest
from prefect.task_runners import ThreadPoolTaskRunner

from flows import runners


def test_in_process_by_default_and_ray_when_an_address_is_set(monkeypatch):
    from prefect_ray import RayTaskRunner

    monkeypatch.delenv(runners.RAY_ADDRESS_ENV, raising=False)
    assert isinstance(runners.task_runner(), ThreadPoolTaskRunner) and not runners.is_ray(runners.task_runner())
    monkeypatch.setenv(runners.RAY_ADDRESS_ENV, "local")
    local = runners.task_runner(init_kwargs={"num_cpus": 1})
    assert isinstance(local, RayTaskRunner) and local.address is None and local.init_kwargs["num_cpus"] == 1
    assert runners.is_ray(local)
    monkeypatch.setenv(runners.RAY_ADDRESS_ENV, "ray://head:10001")
    assert runners.task_runner().address == "ray://head:10001"
    assert runners.task_runner(address="auto").address == "auto"


def test_cells_and_gpus_per_task(monkeypatch):
    monkeypatch.delenv(runners.CELLS_ENV, raising=False)
    monkeypatch.delenv(runners.GPUS_ENV, raising=False)
    assert runners.cells_per_task() == 8
    assert runners.gpus_per_task(0) == 0 and runners.gpus_per_task(4) == 1  # 1 GPU per task when the cluster has any
    monkeypatch.setenv(runners.CELLS_ENV, "3")
    monkeypatch.setenv(runners.GPUS_ENV, "0.5")
    assert runners.cells_per_task() == 3 and runners.gpus_per_task(0) == 0.5 and runners.gpus_per_task(8) == 0.5
    monkeypatch.setenv(runners.CELLS_ENV, "0")
    with pytest.raises(ValueError, match=runners.CELLS_ENV):
        runners.cells_per_task()


def test_command_flow_runs_skip_heartbeats_only_on_the_commands_own_temporary_server(monkeypatch, prefect_harness):
    """A command's flow run on the temporary server it started sends no heartbeats (they mark crashed runs for a
    server that outlives the command, and each run waited up to a second at its end for the heartbeat thread);
    against a running server (PREFECT_API_URL, as here) Prefect's setting applies unchanged."""
    from types import SimpleNamespace

    from prefect import flow
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    from flows.cli import common

    @flow
    def heartbeat_setting():
        return get_current_settings().flows.heartbeat_frequency

    default = get_current_settings().flows.heartbeat_frequency
    url = get_current_settings().api.url
    assert default is not None and url
    monkeypatch.setattr(common, "_server", None)  # no temporary server of the command's own
    with common.local_flow_run():
        assert heartbeat_setting() == default
    # the command started the temporary server (here: one that answers at the harness's address); a server named in
    # the settings still wins over it, as in a process that ran an earlier command without one
    monkeypatch.setattr(common, "_server", SimpleNamespace(url=url, up=True, ready=lambda: True))
    with common.local_flow_run():
        assert heartbeat_setting() == default
    with temporary_settings(restore_defaults={PREFECT_API_URL}):  # no server named: the command's own is used
        with common.local_flow_run():
            assert heartbeat_setting() is None and get_current_settings().api.url == url
    assert heartbeat_setting() == default


def test_a_commands_temporary_server_serves_its_flow_runs_and_stops(monkeypatch, prefect_harness, tmp_path):
    """The temporary server a command starts itself (a child process, as Prefect's own) records the command's flow
    runs, and is gone after `stop`; one that ends before it answers leaves the flow to Prefect's own way."""
    import asyncio

    from prefect import flow, get_client
    from prefect.runtime import flow_run
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    from flows.cli import common

    @flow
    def where() -> tuple[str, str]:
        return str(get_current_settings().api.url), str(flow_run.id)

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    server = common.TemporaryServer()
    try:
        assert server.ready() and server.url != get_current_settings().api.url
        monkeypatch.setattr(common, "_server", server)
        with temporary_settings(restore_defaults={PREFECT_API_URL}), common.local_flow_run():  # no server named
            url, run_id = where()

            async def state() -> str:
                async with get_client() as client:
                    return (await client.read_flow_run(run_id)).state.type.value

            assert url == server.url and asyncio.run(state()) == "COMPLETED"
    finally:
        server.stop()
    assert server.process.poll() is not None
    failed = common.TemporaryServer()
    failed.process.kill()
    assert failed.ready() is False
    monkeypatch.setattr(common, "_server", failed)
    with temporary_settings(restore_defaults={PREFECT_API_URL}), common.local_flow_run():
        assert get_current_settings().api.url is None  # a flow would start Prefect's own temporary server


KILLED_COMMAND = """
import sys, time
from flows.cli import common
server = common.TemporaryServer()  # returns once the server's process runs (it then starts the API)
print(server.process.pid, flush=True)
time.sleep(600)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="the server ends with its command through Linux's prctl")
def test_no_temporary_server_outlives_a_command_killed_with_sigkill(tmp_path):
    """A command killed with SIGKILL (or by the kernel for memory) runs no exit hook; its temporary server ends
    anyway instead of holding a port and memory for good."""
    import os
    import signal
    import subprocess
    import time

    from flows import interrupt

    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    command = subprocess.Popen([sys.executable, "-c", KILLED_COMMAND], env=env, stdout=subprocess.PIPE, text=True)
    try:
        server_pid = int(command.stdout.readline())
        assert server_pid in interrupt.child_pids(command.pid) and interrupt._alive(server_pid)
    finally:
        command.send_signal(signal.SIGKILL)
        command.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and interrupt._alive(server_pid):
        time.sleep(0.1)
    alive = interrupt._alive(server_pid)
    if alive:
        os.kill(server_pid, signal.SIGKILL)
    assert not alive, "the temporary server outlived its command"


def test_a_temporary_server_that_cannot_start_leaves_the_flow_to_prefects_own(monkeypatch, prefect_harness):
    """If the command cannot start its server (no process, another Prefect), it runs on: the flow starts Prefect's
    own temporary server, which reports what goes wrong."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.cli import common

    def cannot_start():
        raise FileNotFoundError("no such interpreter")

    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # offline_prefect's defaults, undone after
    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    monkeypatch.setattr(common, "TemporaryServer", cannot_start)
    monkeypatch.setattr(common, "_server", None)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):  # no server named: the command would start one
        common.offline_prefect()
        assert common._server is None
        with common.local_flow_run():
            assert PREFECT_API_URL.value() is None  # nothing pointed elsewhere: Prefect's own way
