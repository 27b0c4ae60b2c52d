"""The `clipforget` console command. Heavy imports happen inside each command."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer

from flows import cli_models

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Training- and data-free unlearning for CLIP.")
toy_app = typer.Typer(no_args_is_help=True, help="The toy world: renderer and toy model.")
app.add_typer(toy_app, name="toy")
cli_models.register(app)  # models list|show|promote|rollback, export, alerts install (flows/cli_models.py)

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
HELDOUT = typer.Option(20, "--heldout-per-cell", help="Held-out prototypes per cell for data-free evaluation "
                       "(20: the fewest whose 95% upper bound can pass the 0.15 forget limit, docs/GATE.md).")


class UserError(Exception):
    """Bad input: reported on one line, exit code 2."""


def _fail(e: BaseException) -> None:
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(2)


def _synthesis(model: str, k: int, steps: int, target: float | None, seed: int, precision: str = "auto") -> Any:
    from clipforget.governance.request import SynthesisSettings

    return SynthesisSettings(prototypes_per_cell=k, steps=steps, target_cosine=target, seed=seed,
                             precision=precision).config(model)


def _load(model: str, checkpoint: Path | None, pretrained: str | None, device: str | None) -> Any:
    from clipforget.io.checkpoints import load_model

    return load_model(model, checkpoint, pretrained, device)


def _grid(spec: str | None, model: str, data: Path | None) -> Any:
    from clipforget.method.data import grid_of_folder
    from clipforget.method.grid import resolve_grid

    if spec is not None:
        return resolve_grid(spec)
    if model == "toy":
        return resolve_grid("toy")
    if data is not None:
        return grid_of_folder(data)
    raise UserError("give --grid (pacs, domainnet or a JSON file) or --data for a model other than toy")


def _templates(path: Path | None) -> Any:
    from clipforget.method.prompts import TemplateSet

    return TemplateSet.from_file(path) if path is not None else TemplateSet()


def _progress(every_s: float = 2.0):
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


def _bank() -> Any:
    """The prototype bank every command shares (CLIPFORGET_CACHE/prototypes, as the pipeline's)."""
    from clipforget.io.bank import PrototypeBank
    from clipforget.io.storage import cache_root

    return PrototypeBank(cache_root() / "prototypes")


def _user_errors():
    from clipforget.io.checkpoints import ModelLoadError

    return (UserError, ModelLoadError, ValueError, FileNotFoundError)


@toy_app.command("render")
def toy_render(
    out: Path = typer.Option(..., "--out", help="Folder to write <domain>/<class>/<i>.png into."),
    per_cell: int = typer.Option(50, "--per-cell"),
    seed: int = typer.Option(..., "--seed", help="Render seed; the toy model was trained on seed 0."),
) -> None:
    """Render labelled toy-world images in the PACS/DomainNet folder layout."""
    from clipforget.method.data import write_image
    from clipforget.method.grid import Cell
    from clipforget.toyworld.render import CLASSES, DOMAINS, render_image

    if per_cell < 1:
        _fail(ValueError("--per-cell must be at least 1"))
    for d in DOMAINS:
        for c in CLASSES:
            for i in range(per_cell):
                write_image(out, Cell(c, d), i, render_image(c, d, seed, i))
    typer.echo(f"wrote {per_cell * len(CLASSES) * len(DOMAINS)} images to {out}")


@toy_app.command("train")
def toy_train(
    out: Path = typer.Option(Path("clipforget/toyworld/weights/toy.safetensors"), help="Where to write the weights."),
    steps: int = typer.Option(1200),
    batch_size: int = typer.Option(256),
    per_cell: int = typer.Option(1500, help="Pre-rendered training images per (class, domain) cell."),
    seed: int = typer.Option(0),
) -> None:
    """Train the toy CLIP model from scratch on rendered images (about 15 minutes on 2 CPU cores)."""
    from clipforget.toyworld.train import TrainConfig, train_toy_model

    summary = train_toy_model(out, TrainConfig(steps=steps, batch_size=batch_size, per_cell=per_cell, seed=seed),
                              progress=typer.echo)
    typer.echo(json.dumps(summary, indent=2))


@app.command("eval")
def eval_cmd(
    json_out: Path = typer.Option(..., "--json", help="Where to write the report."),
    model: str = MODEL,
    checkpoint: Path = CHECKPOINT,
    pretrained: str = PRETRAINED,
    data: Path = typer.Option(None, "--data", help="Labelled folder <domain>/<class>/*.png|jpg; without it, "
                              "data-free evaluation on held-out prototypes."),
    grid: str = GRID,
    prototypes_per_cell: int = typer.Option(20, "--prototypes-per-cell", "--heldout-per-cell",
                                            help="Held-out prototypes per cell for data-free evaluation."),
    steps: int = STEPS,
    target_cosine: float = TARGET,
    seed: int = SEED,
    precision: str = PRECISION,
    templates: Path = TEMPLATES,
    device: str = DEVICE,
    model_uri: str = typer.Option(None, "--model-uri", help="A registered model, e.g. models:/NAME@champion "
                                  "(MLflow pyfunc; needs --data)."),
) -> None:
    """Zero-shot accuracy per (class, domain) cell."""
    from clipforget.forget import heldout_images
    from clipforget.io.atomic import write_json
    from clipforget.method.evaluate import LabelledImages, ZeroShotClassifier, image_features

    if model_uri is not None:
        return _eval_registered(model_uri, data, json_out)
    try:
        g = _grid(grid, model, data)
        prompts = _templates(templates)
        loaded = _load(model, checkpoint, pretrained, device)
        if data is not None:
            images = LabelledImages.from_folder(data, loaded.preprocess, g)
        else:
            cfg = _synthesis(model, prototypes_per_cell, steps, target_cosine, seed, precision)
            images = heldout_images(loaded, g, cfg, prototypes_per_cell, prompts, progress=_progress(), bank=_bank())
    except _user_errors() as e:
        _fail(e)
    report = ZeroShotClassifier(loaded.model, loaded.tokenizer, g, prompts).evaluate(
        image_features(loaded.model, images.pixels), images.cells).to_dict()
    report.update({"model": model, "checkpoint": str(checkpoint) if checkpoint else loaded.checkpoint,
                   "sha256": loaded.sha256, "grid": g.name,
                   "data": str(data) if data else f"held-out prototypes ({prototypes_per_cell}/cell)"})
    write_json(json_out, report)
    typer.echo(f"accuracy {report['accuracy']:.4f} over {len(images.cells)} images in {len(report['cells'])} cells")


@app.command("forget")
def forget_cmd(
    out: Path = typer.Option(..., "--out", help="Where to write the unlearned checkpoint (.safetensors)."),
    json_out: Path = typer.Option(..., "--json", help="Where to write the report."),
    mode: str = typer.Option(..., "--mode", help="global, domain or domain_complete."),
    classes: str = typer.Option("", "--classes", help="Comma-separated classes to forget."),
    domains: str = typer.Option("", "--domains", help="Comma-separated domains."),
    model: str = MODEL,
    checkpoint: Path = CHECKPOINT,
    pretrained: str = PRETRAINED,
    grid: str = GRID,
    data: Path = typer.Option(None, "--data", help="Labelled folder to measure before/after on; without it, "
                              "held-out prototypes."),
    prototypes_per_cell: int = K,
    steps: int = STEPS,
    target_cosine: float = TARGET,
    seed: int = SEED,
    precision: str = PRECISION,
    heldout_per_cell: int = HELDOUT,
    kind: str = typer.Option(None, "--projection", help="soft, hard or margin (default per mode)."),
    source: str = typer.Option(None, "--source", help="text, prototypes or multimodal (default per mode)."),
    templates: Path = TEMPLATES,
    device: str = DEVICE,
) -> None:
    """Run the core method without orchestration: write the unlearned checkpoint and a report."""
    from clipforget.forget import run_forget
    from clipforget.io.atomic import write_json
    from clipforget.method.grid import forget_cells, parse_names
    from clipforget.method.projection import default_config

    cls_list, dom_list = parse_names(classes), parse_names(domains)
    try:
        if out.suffix != ".safetensors":
            raise UserError(f"--out must end in .safetensors, got {out.name}")
        g = _grid(grid, model, data)
        forget_cells(g, mode, cls_list, dom_list)  # a bad request fails before the model loads
        ns = default_config(mode, kind=kind, source=source)
        prompts = _templates(templates)
        loaded = _load(model, checkpoint, pretrained, device)
        result = run_forget(loaded, g, mode, cls_list, dom_list,
                            _synthesis(model, prototypes_per_cell, steps, target_cosine, seed, precision), ns, out, data,
                            heldout_per_cell, prompts, progress=_progress(), bank=_bank())
    except _user_errors() as e:
        _fail(e)
    write_json(json_out, result.report)
    m = result.report["metrics"]
    typer.echo(f"forget accuracy {m['forget_before']:.3f} -> {m['forget_after']:.3f}; retain accuracy "
               f"{m['retain_before']:.3f} -> {m['retain_after']:.3f} (max cell drop {m['retain_max_cell_drop']:.3f})")
    typer.echo(f"wrote {out} and {json_out}")


def _eval_registered(model_uri: str, data: Path | None, json_out: Path) -> None:
    from clipforget.io import registry
    from clipforget.io.atomic import write_json
    from clipforget.method.evaluate import score_cells

    try:
        if data is None:
            raise UserError("--model-uri needs --data: a registered model is evaluated on labelled images")
        labels, cells = registry.classify_folder(registry.load_pyfunc(model_uri), data)
    except _user_errors() as e:
        _fail(e)
    except Exception as e:  # the registry is unreachable, or no such model/alias
        _fail(RuntimeError(f"cannot load {model_uri} from {registry.tracking_uri()}: {type(e).__name__}: {e}"))
    report = score_cells(labels, cells).to_dict()
    report.update({"model_uri": model_uri, "data": str(data)})
    write_json(json_out, report)
    typer.echo(f"accuracy {report['accuracy']:.4f} over {len(cells)} images in {len(report['cells'])} cells")


@app.command("unlearn")
def unlearn_cmd(
    json_out: Path = typer.Option(None, "--json", help="Where to write the report (default runs/unlearn-REQUEST_ID.json; "
                                  "the approved or rejected run's is also kept in CLIPFORGET_CACHE/runs/REQUEST_ID/)."),
    mode: str = typer.Option(..., "--mode", help="global, domain or domain_complete."),
    classes: str = typer.Option("", "--classes", help="Comma-separated classes to forget."),
    domains: str = typer.Option("", "--domains", help="Comma-separated domains."),
    model: str = MODEL,
    checkpoint: str = typer.Option(None, "--checkpoint", help="s3://bucket/key, file:// or a local path "
                                   "(default for toy: the bundled weights)."),
    checkpoint_sha256: str = typer.Option(None, "--checkpoint-sha256", help="Expected sha256 of the checkpoint "
                                          "(default: the S3 object's sha256 metadata when present)."),
    grid: str = GRID,
    data: str = typer.Option(None, "--data", help="Labelled <domain>/<class>/ images: S3 prefix or folder; "
                             "without it, data-free validation on held-out prototypes."),
    max_forget_acc: float = typer.Option(None, "--max-forget-acc", help="Largest accuracy any forget cell may keep."),
    max_retain_drop: float = typer.Option(None, "--max-retain-drop", help="Largest accuracy drop of any retain cell."),
    mode_criteria: bool = typer.Option(True, "--mode-criteria/--no-mode-criteria",
                                       help="Also apply the mode's acceptance criteria."),
    registered_name: str = typer.Option(None, "--registered-name", help="MLflow model name (default clipforget-ARCH)."),
    promote: bool = typer.Option(False, "--promote", help="Move the `champion` alias to the approved version."),
    request_id: str = typer.Option(None, "--request-id", help="Idempotency key (default: a digest of the request)."),
    requested_by: str = typer.Option(None, "--requested-by", help="Who asked (default: the login name)."),
    prototypes_per_cell: int = K,
    steps: int = STEPS,
    target_cosine: float = TARGET,
    seed: int = SEED,
    precision: str = PRECISION,
    heldout_per_cell: int = HELDOUT,
    kind: str = typer.Option(None, "--projection", help="soft, hard or margin (default per mode)."),
    source: str = typer.Option(None, "--source", help="text, prototypes or multimodal (default per mode)."),
) -> None:
    """Run the Prefect pipeline: fetch, unlearn, validate, and register the model in MLflow if it passes."""
    import pydantic

    from clipforget.gate.verdict import Thresholds
    from clipforget.governance.request import SynthesisSettings, UnlearnRequest
    from clipforget.method.grid import forget_cells, parse_names

    cls_list, dom_list = parse_names(classes), parse_names(domains)
    try:
        fields: dict[str, Any] = {
            "mode": mode, "classes": cls_list, "domains": dom_list, "arch": model, "checkpoint_uri": checkpoint,
            "checkpoint_sha256": checkpoint_sha256, "grid": grid, "data_uri": data, "projection": kind,
            "source": source, "registered_name": registered_name, "promote": promote,
            "thresholds": Thresholds(max_forget_acc=max_forget_acc, max_retain_drop=max_retain_drop,
                                     mode_criteria=mode_criteria),
            "synthesis": SynthesisSettings(prototypes_per_cell=prototypes_per_cell, steps=steps,
                                           target_cosine=target_cosine, seed=seed, heldout_per_cell=heldout_per_cell,
                                           precision=precision)}
        if request_id:
            fields["request_id"] = request_id
        if requested_by:
            fields["requested_by"] = requested_by
        request = UnlearnRequest(**fields)
        if grid is not None or model == "toy":  # a bad request fails before Prefect starts
            g = _grid(grid, model, None)
            forget_cells(g, mode, cls_list, dom_list)
            if data is not None and "://" not in data:  # a local folder: checked now (an S3 prefix in the flow)
                from clipforget.method.data import check_labelled_folder

                check_labelled_folder(data, g)
    except pydantic.ValidationError as e:
        _fail(ValueError("; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())))
    except _user_errors() as e:
        _fail(e)
    _offline_prefect()
    from flows.unlearn import unlearn

    json_out = json_out or Path("runs") / f"unlearn-{request.request_id}.json"
    json_out.unlink(missing_ok=True)  # a report from an earlier run of this request must not pass for this one
    state = unlearn(request, str(json_out), return_state=True)
    if not json_out.is_file():
        typer.echo(f"error: the flow ended {state.type.value} before a report: {state.message}", err=True)
        raise typer.Exit(1)
    report = json.loads(json_out.read_text())
    if "metrics" in report:
        m = report["metrics"]
        typer.echo(f"forget accuracy {m['forget_before']:.3f} -> {m['forget_after']:.3f}; retain accuracy "
                   f"{m['retain_before']:.3f} -> {m['retain_after']:.3f} (max cell drop {m['retain_max_cell_drop']:.3f})")
    reg = report.get("registered")
    if report.get("passed") and reg:
        aliases = ", ".join(reg.get("aliases") or []) or "none"
        typer.echo(f"{'already registered' if report.get('reused') else 'approved: registered'} {reg['name']} "
                   f"version {reg['version']} (aliases: {aliases}); request {report['request_id']}")
        typer.echo(f"wrote {json_out}")
        return
    typer.echo(f"rejected, nothing registered: {report.get('rejected') or state.message}", err=True)
    typer.echo(f"wrote {json_out}")
    raise typer.Exit(1)


request_app = typer.Typer(no_args_is_help=True, help="Data-deletion requests and their ledger.")
app.add_typer(request_app, name="request")
LEDGER = typer.Option(None, "--ledger", help="Ledger folder or s3://bucket/prefix/ (default: CLIPFORGET_LEDGER, "
                      "else ./ledger).")
POLICY = typer.Option(None, "--policy", help="Model policy JSON: base checkpoint, grid, data, thresholds, synthesis, "
                      "registered name (default: the bundled toy model, data-free validation, clipforget-toy).")


def _validation_message(e: Any) -> str:
    return "; ".join(f"{'.'.join(map(str, err['loc'])) or 'request'}: {err['msg']}" for err in e.errors())


def _load_model_json(cls: Any, path: Path | None, what: str) -> Any:
    import pydantic

    if path is None:
        return cls()
    from clipforget.governance.request import read_json_file

    try:
        return cls.model_validate_json(read_json_file(path, what))
    except FileNotFoundError:
        _fail(FileNotFoundError(f"{what} file {path} does not exist"))
    except pydantic.ValidationError as e:
        _fail(ValueError(f"{path}: {_validation_message(e)}"))
    except ValueError as e:  # too large, not UTF-8
        _fail(e)


def _offline_prefect() -> None:
    """Before a command runs flows: no telemetry, and SIGTERM/Ctrl-C stop it within seconds (flows/interrupt.py)."""
    import os

    from flows import interrupt

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # offline by default; no telemetry
    interrupt.install(" ".join(["clipforget", *(a for a in sys.argv[1:3] if not a.startswith("-"))]))


def _report_of(json_out: Path, state: Any) -> dict:
    if not json_out.is_file():
        typer.echo(f"error: the flow ended {state.type.value} before a report: {state.message}", err=True)
        raise typer.Exit(1)
    return json.loads(json_out.read_text())


@request_app.command("submit")
def request_submit(
    file: Path = typer.Argument(..., help='Request JSON: {"request_id": "dsr-1", "requested_by": "...", "reason": "...", '
                                '"mode": "global", "classes": ["star"], "domains": []}.'),
    policy_file: Path = POLICY,
    ledger: str = LEDGER,
    promote: bool = typer.Option(False, "--promote", help="Move the `champion` alias to the approved version."),
    no_build: bool = typer.Option(False, "--no-build", help="Only append to the ledger; the next governance run "
                                  "builds every pending request in one batch."),
    deployment: str = typer.Option(None, "--deployment", help="Run through a Prefect deployment (e.g. "
                                   "deletion-request/on-demand) instead of in this process; prints the flow run id."),
    json_out: Path = typer.Option(None, "--json", help="Where to write the report (default runs/request-ID.json)."),
) -> None:
    """Validate a deletion request, append it to the ledger and build + register the cumulative model."""
    import pydantic

    from clipforget.governance.request import DeletionRequest, ModelPolicy, read_json_file
    from tasks.record import ledger_location

    try:
        request = DeletionRequest.model_validate_json(read_json_file(file, "request"))
    except FileNotFoundError:
        _fail(FileNotFoundError(f"request file {file} does not exist"))
    except pydantic.ValidationError as e:
        _fail(ValueError(f"{file}: {_validation_message(e)}"))
    except ValueError as e:  # too large, not UTF-8
        _fail(e)
    policy = _load_model_json(ModelPolicy, policy_file, "policy")
    location = ledger_location(ledger)
    try:
        local_policy = deployment is None or policy_file is not None  # else the deployment's policy decides
        if local_policy and (policy.grid is not None or policy.arch == "toy"):  # bad input fails before any write
            request.cells(_grid(policy.grid, policy.arch, None))
    except _user_errors() as e:
        _fail(e)
    _offline_prefect()
    if deployment:
        from prefect.deployments import run_deployment

        # the deployment's own policy and its workers' CLIPFORGET_LEDGER apply unless given here
        parameters: dict[str, Any] = {"request": request.model_dump(), "promote": promote}
        if policy_file is not None:
            parameters["policy"] = policy.model_dump()
        if ledger is not None:
            parameters["ledger"] = ledger
        run = run_deployment(deployment, timeout=0, parameters=parameters)
        typer.echo(f"submitted {request.request_id} to deployment {deployment}: flow run {run.id} ({run.name})")
        return
    if no_build:
        from clipforget.governance.ledger import Ledger, LedgerError

        try:
            entry, appended = Ledger(location).append(request.request_id, request.ledger_record())
        except LedgerError as e:
            _fail(e)
        typer.echo(f"{'appended' if appended else 'already in the ledger:'} {request.request_id} as entry {entry.seq} "
                   f"of {location} (hash {entry.hash[:16]}); `clipforget govern` builds it")
        return
    from flows.deletion_request import deletion_request

    json_out = json_out or Path("runs") / f"request-{request.request_id}.json"
    json_out.unlink(missing_ok=True)
    state = deletion_request(request, policy, location, promote, str(json_out), return_state=True)
    report = _report_of(json_out, state)
    reg = report.get("registered")
    if report.get("passed") and reg:
        led = report.get("ledger") or {}
        typer.echo(f"{request.request_id}: ledger entry {report['deletion_request']['entry']}; "
                   f"{'already registered' if report.get('reused') else 'approved: registered'} {reg['name']} version "
                   f"{reg['version']} (aliases: {', '.join(reg.get('aliases') or []) or 'none'}) covering "
                   f"{len(led.get('request_ids') or reg.get('request_ids') or [])} request(s)")
        typer.echo(f"wrote {json_out}")
        return
    typer.echo(f"rejected, nothing registered (the request stays in the ledger): {report.get('rejected') or state.message}",
               err=True)
    typer.echo(f"wrote {json_out}")
    raise typer.Exit(1)


def _ledger_entries(ledger: str | None) -> tuple[str, list]:
    from clipforget.governance.ledger import Ledger, LedgerError
    from tasks.record import ledger_location

    location = ledger_location(ledger)
    try:
        return location, Ledger(location).entries()
    except LedgerError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None


@request_app.command("list")
def request_list(ledger: str = LEDGER, json_out: Path = typer.Option(None, "--json")) -> None:
    """Every request in the ledger, oldest first (the hash chain is verified first)."""
    from clipforget.io.atomic import write_json

    location, entries = _ledger_entries(ledger)
    if json_out:
        write_json(json_out, [e.to_dict() for e in entries])
    if not entries:
        typer.echo(f"ledger {location} is empty")
    for e in entries:
        r = e.request
        what = ", ".join(r.get("classes") or []) or "all classes"
        where = ", ".join(r.get("domains") or []) or "all domains"
        typer.echo(f"{e.seq:4d}  {e.request_id}  {r['mode']}: {what} in {where}  by {r.get('requested_by', '?')}  "
                   f"{e.hash[:12]}")
    if entries:
        typer.echo(f"head {entries[-1].hash} ({len(entries)} requests, chain verified)")


@request_app.command("show")
def request_show(request_id: str = typer.Argument(...), ledger: str = LEDGER, policy_file: Path = POLICY) -> None:
    """One ledger entry as JSON, and the registered versions that cover it."""
    from clipforget.governance.request import ModelPolicy
    from clipforget.io import registry

    _, entries = _ledger_entries(ledger)
    entry = next((e for e in entries if e.request_id == request_id), None)
    if entry is None:
        _fail(ValueError(f"request {request_id!r} is not in the ledger"))
    assert entry is not None
    policy = _load_model_json(ModelPolicy, policy_file, "policy")
    out = entry.to_dict()
    try:
        out["covered_by"] = [{"name": policy.registered_name, "version": v["version"], "aliases": v["aliases"]}
                             for v in registry.versions(policy.registered_name) if request_id in v["request_ids"]]
    except Exception as e:  # the registry is unreachable: the ledger entry is still worth showing
        out["covered_by"] = f"unknown ({type(e).__name__})"
    typer.echo(json.dumps(out, indent=1))


@app.command("govern")
def govern_cmd(
    policy_file: Path = POLICY,
    ledger: str = LEDGER,
    promote: bool = typer.Option(True, "--promote/--no-promote", help="Promote the version built for pending requests."),
    json_out: Path = typer.Option(None, "--json", help="Where to write the report (default runs/governance.json)."),
) -> None:
    """Run governance once: build pending ledger requests in one batch, audit the champion, write the report."""
    from clipforget.governance.request import ModelPolicy

    policy = _load_model_json(ModelPolicy, policy_file, "policy")
    _offline_prefect()
    from flows.governance import governance

    json_out = json_out or Path("runs") / "governance.json"
    json_out.unlink(missing_ok=True)
    state = governance(policy, ledger, promote, str(json_out), return_state=True)
    report = _report_of(json_out, state)
    typer.echo(report["published"]["markdown"])
    typer.echo(f"compliance report: MLflow run {report['published']['mlflow_run_id']}; wrote {json_out}")
    if not report["passed"]:
        raise typer.Exit(1)


@app.command("rebuild")
def rebuild_cmd(
    head: str = typer.Option(None, "--head", help="Ledger entry hash (or its first 6+ characters, as `request list` "
                             "prints them) to rebuild up to (default: the current head)."),
    policy_file: Path = POLICY,
    ledger: str = LEDGER,
) -> None:
    """Rebuild the model of a ledger head from the base checkpoint and compare it with the registered version."""
    from clipforget.governance.request import ModelPolicy
    from clipforget.io import registry

    policy = _load_model_json(ModelPolicy, policy_file, "policy")
    _offline_prefect()
    from clipforget.governance.ledger import Ledger, LedgerError
    from flows.deletion_request import rebuild
    from tasks.record import ledger_location

    try:
        head = Ledger(ledger_location(ledger)).resolve(head) if head else None  # bad input fails before the flow
    except LedgerError as e:
        _fail(e)
    report = rebuild(policy, ledger, head)
    sha = report["output"]["sha256"]
    vid = report["request_id"]
    registered = next((v for v in registry.versions(policy.registered_name) if v["request_id"] == vid), None)
    typer.echo(f"rebuilt {vid}: sha256 {sha}")
    if registered is None:
        typer.echo("no registered version for this ledger head")
        return
    same = registered["sha256"] == sha
    typer.echo(f"{policy.registered_name} version {registered['version']}: sha256 {registered['sha256']} "
               f"({'identical' if same else 'DIFFERENT'})")
    if not same:
        raise typer.Exit(1)


def main() -> None:  # pragma: no cover
    app(prog_name="clipforget")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
