"""What the `clipforget` commands share: the app and its groups, common options, input parsing, error exits."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Training- and data-free unlearning for CLIP.")
toy_app = typer.Typer(no_args_is_help=True, help="The toy world: renderer and toy model.")
app.add_typer(toy_app, name="toy")
request_app = typer.Typer(no_args_is_help=True, help="Data-deletion requests and their ledger.")
app.add_typer(request_app, name="request")

MODEL = typer.Option("toy", "--model", help="'toy' or an open_clip architecture name such as ViT-B-32.")
CHECKPOINT = typer.Option(None, "--checkpoint", help="Local checkpoint: safetensors or a torch state dict.")
PRETRAINED = typer.Option(None, "--pretrained", help="open_clip pretrained tag (downloads from the model hub).")
GRID = typer.Option(None, "--grid", help="toy, pacs, domainnet or a grid JSON file (default: toy for the toy "
                    "model, else the folder given by --data).")
DEVICE = typer.Option(None, "--device", help="torch device; default cuda when present, else cpu.")
K = typer.Option(8, "--prototypes-per-cell", help="Synthesized prototypes per cell.")
STEPS = typer.Option(150, "--steps", help="Synthesis steps (at most; images stop early at the target).")
TARGET = typer.Option(None, "--target-cosine", help="Early-stop cosine (default 0.77 for the toy model, 0.30 else).")
SEED = typer.Option(0, "--seed", help="Seed of prototype synthesis.")
TEMPLATES = typer.Option(None, "--templates", help='Prompt templates JSON: {"domains": {"sketch": ["a sketch of a {}.", '
                         '...]}, "class_only": ["a {}."]} (default: the built-in domain-aware templates).')
PRECISION = typer.Option("auto", "--precision", help="Synthesis precision: auto (bf16 only where the hardware does "
                         "it natively: CUDA with bf16, AVX512-BF16/AMX CPUs; else fp32), fp32 or bf16.")
HELDOUT = typer.Option(None, "--heldout-per-cell", help="Held-out prototypes per cell for data-free evaluation. "
                       "Default: as many per cell as the gate's checks need (20 for a forgotten cell: the fewest whose "
                       "95% upper bound can pass the 0.15 limit; 10 for most kept cells; docs/GATE.md).")
PROJECTION = typer.Option(None, "--projection", help="soft, hard, margin or gated (default per mode).")
SOURCE = typer.Option(None, "--source", help="text, prototypes or multimodal (default per mode).")
PROBE = typer.Option(None, "--max-probe-excess", help="Also gate on the residual-knowledge probe: the largest held-out "
                     "accuracy above chance (95% upper bound) a linear probe may reach telling a forgotten cell from "
                     "its nearest kept cells in the released image embedding. Default: reported, not checked.")


class UserError(Exception):
    """Bad input: reported on one line, exit code 2."""


def fail(e: BaseException) -> None:
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(2)


def synthesis_config(model: str, k: int, steps: int, target: float | None, seed: int, precision: str = "auto") -> Any:
    from clipforget.governance.request import SynthesisSettings

    return SynthesisSettings(prototypes_per_cell=k, steps=steps, target_cosine=target, seed=seed,
                             precision=precision).config(model)


def load(model: str, checkpoint: Path | None, pretrained: str | None, device: str | None) -> Any:
    from clipforget.io.checkpoints import load_model

    return load_model(model, checkpoint, pretrained, device)


def grid_of(spec: str | None, model: str, data: Path | None) -> Any:
    from clipforget.method.data import grid_of_folder
    from clipforget.method.grid import resolve_grid

    if spec is not None:
        return resolve_grid(spec)
    if model == "toy":
        return resolve_grid("toy")
    if data is not None:
        return grid_of_folder(data)
    raise UserError("give --grid (pacs, domainnet or a JSON file) or --data for a model other than toy")


def templates_of(path: Path | None) -> Any:
    from clipforget.method.prompts import TemplateSet

    return TemplateSet.from_file(path) if path is not None else TemplateSet()


def progress_bar(every_s: float = 2.0):
    """Synthesis progress on stderr: one bar redrawn in place on a terminal, else a line every few seconds."""
    import time

    from clipforget.method.synthesis import format_progress

    tty = sys.stderr.isatty()
    last = [float("-inf")]

    def show(p: dict) -> None:
        now = time.monotonic()
        final = p["done"] == p["total"]
        if tty:
            sys.stderr.write("\r" + format_progress(p) + ("\n" if final else ""))
            sys.stderr.flush()
        elif final or now - last[0] >= every_s:
            last[0] = now
            typer.echo(format_progress(p), err=True)
    return show


def bank() -> Any:
    """The prototype bank every command shares (CLIPFORGET_CACHE/prototypes, as the pipeline's)."""
    from clipforget.io.bank import PrototypeBank
    from clipforget.io.storage import cache_root

    return PrototypeBank(cache_root() / "prototypes")


def user_errors():
    from clipforget.io.checkpoints import ModelLoadError

    return (UserError, ModelLoadError, ValueError, FileNotFoundError)


LEDGER = typer.Option(None, "--ledger", help="Ledger folder or s3://bucket/prefix/ (default: CLIPFORGET_LEDGER, "
                      "else ./ledger).")
POLICY = typer.Option(None, "--policy", help="Model policy JSON: base checkpoint, grid, data, thresholds, synthesis, "
                      "registered name (default: the bundled toy model, data-free validation, clipforget-toy).")


def validation_message(e: Any) -> str:
    """A pydantic ValidationError on one line: each error's field (or `request`) and message."""
    return "; ".join(f"{'.'.join(map(str, err['loc'])) or 'request'}: {err['msg'].removeprefix('Value error, ')}"
                     for err in e.errors())


def load_model_json(cls: Any, path: Path | None, what: str) -> Any:
    import pydantic

    if path is None:
        return cls()
    from clipforget.governance.request import read_json_file

    try:
        return cls.model_validate_json(read_json_file(path, what))
    except FileNotFoundError:
        fail(FileNotFoundError(f"{what} file {path} does not exist"))
    except pydantic.ValidationError as e:
        fail(ValueError(f"{path}: {validation_message(e)}"))
    except ValueError as e:  # too large, not UTF-8
        fail(e)


class TemporaryServer:
    """Prefect's temporary server, started by the command itself as a child process: the uvicorn command Prefect's
    own `SubprocessASGIServer` runs (the API app, no UI, ephemeral mode, the command's Prefect settings), on a free
    port. Started this way the command does not import Prefect's server package (1.8 s of imports in Prefect's way,
    which held the interpreter lock while the command loaded torch and open_clip); the child imports it on the other
    core. `local_flow_run` points the command's flow runs at it; it stops at exit (and with the command's other
    children on SIGTERM/Ctrl-C, flows/interrupt.py)."""

    def __init__(self) -> None:
        import atexit
        import functools
        import os
        import socket
        import subprocess

        import prefect
        from prefect.settings import get_current_settings

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/api"
        self.up: bool | None = None
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1",
               **get_current_settings().to_environment_variables(exclude_unset=True)}
        self.process: Any = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory",
             "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port), "--log-level", "error",
             "--lifespan", "on"], env=env,
            preexec_fn=functools.partial(_end_with_parent, os.getpid()) if sys.platform == "linux" else None)
        atexit.register(self.stop)

    def ready(self) -> bool:
        """Wait until the server answers (True) or its process ended or it did not answer in Prefect's startup
        timeout (False: the flow then starts Prefect's own temporary server, which reports what goes wrong)."""
        if self.up is None:
            import time
            import urllib.request

            from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

            deadline = time.monotonic() + PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
            self.up = False
            while time.monotonic() < deadline and self.process.poll() is None:
                try:
                    with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                        if r.status == 200:
                            self.up = True
                            break
                except OSError:
                    pass
                time.sleep(0.05)
            if not self.up:
                self.stop()
        return self.up

    def stop(self) -> None:
        import subprocess

        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _end_with_parent(parent: int) -> None:
    """In the server's process before it starts (Linux): SIGTERM when the command's process ends, however it ends;
    a command killed with SIGKILL (or by the kernel for memory) cannot stop its children, so no server outlives it."""
    import ctypes
    import os
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the command ended before the line above took effect
        os._exit(1)


_server: Any = None  # the command's own temporary Prefect server (offline_prefect), or None


def offline_prefect(start_server: bool = True) -> None:
    """Before a command runs flows: no telemetry, SIGTERM/Ctrl-C stop it within seconds (flows/interrupt.py), and
    without a Prefect server to talk to, a temporary one starts now, as a child process, while the command imports
    torch and the flows (`prefect_ready` waits for it; `local_flow_run` points flow runs at it): the two take a few
    seconds each (docs/BENCHMARKS.md)."""
    import os

    from flows import interrupt

    global _server
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # offline by default; no telemetry
    # Prefect's temporary server gets 20 s to start by default, which a loaded 2-core machine can miss
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    interrupt.install(" ".join(["clipforget", *(a for a in sys.argv[1:3] if not a.startswith("-"))]))
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if start_server and _server is None and not PREFECT_API_URL.value() and PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        try:
            _server = TemporaryServer()
        except Exception:  # noqa: BLE001  (no process started, or another Prefect: the flow starts Prefect's own,
            _server = None  # which reports what goes wrong)


def prefect_ready() -> None:
    """Load torch and open_clip (every flow's first steps need them) while the temporary server that
    `offline_prefect` started comes up, then wait for it (up, or failed to start)."""
    import open_clip  # noqa: F401
    import torch  # noqa: F401

    if _server is not None:
        _server.ready()


@contextlib.contextmanager
def local_flow_run() -> Iterator[None]:
    """Around a command's calls to Prefect (a flow run, `run_deployment`): `prefect_ready`, and on the command's own
    temporary server, its address and no flow-run heartbeats. They let a lasting server mark a crashed run; the
    temporary server ends with the command, and each flow run waited up to a second at its end for the heartbeat
    thread's sleep (docs/BENCHMARKS.md). Against a running server (`PREFECT_API_URL`) Prefect's settings apply
    unchanged."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    prefect_ready()
    # a server named in the settings (PREFECT_API_URL; a test harness) takes precedence over one this process started
    # for an earlier command
    if _server is None or PREFECT_API_URL.value() or not _server.up:
        yield
        return

    with temporary_settings(updates={"api.url": _server.url, "flows.heartbeat_frequency": None}):
        yield


DATA_FREE_NOTE = ("note: judged data-free, on held-out prototypes rather than images; --data DIR (or a policy's data_uri) "
                  "gives a verdict on images")


DATA_FREE_REJECTED_NOTE = ("note: rejected on held-out prototypes, not on images (they disagree both ways); --data DIR "
                           "(a policy's data_uri) gives a verdict on images")
FIT_ON_IMAGES_NOTE = ("; --fit-data DIR (a policy's fit_uri) fits the projection on labelled images, which carries "
                      "requests that prototypes do not (docs/REQUESTS-FIT-IMAGES.md)")


def echo_data_free(data_free: bool, passed: bool = True, fitted_on_images: bool = False) -> None:
    """One line after a verdict judged on held-out prototypes (`data_free`): an approval was not judged on images
    (the model card and the Prefect summary say the same, longer: clipforget.gate.verdict.DATA_FREE_CAVEAT); a
    rejection was not either, and labelled images are the way on (clipforget.gate.verdict.DATA_FREE_REJECTION)."""
    if not data_free:
        return
    if passed:
        typer.echo(DATA_FREE_NOTE)
    else:
        typer.echo(DATA_FREE_REJECTED_NOTE + ("" if fitted_on_images else FIT_ON_IMAGES_NOTE), err=True)


def fitted_on_images(report: dict) -> bool:
    """Whether a flow's report says the projection was fitted on labelled images (a policy's fit_uri, --fit-data)."""
    return (report.get("fit") or {}).get("on") == "images"


def report_of(json_out: Path, state: Any) -> dict:
    if not json_out.is_file():
        typer.echo(f"error: the flow ended {state.type.value} before a report: {state.message}", err=True)
        raise typer.Exit(1)
    return json.loads(json_out.read_text())
