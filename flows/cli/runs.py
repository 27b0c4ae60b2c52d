"""`clipforget unlearn`, `govern` and `rebuild`: commands that run the Prefect flows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from flows.cli.common import (
    GRID,
    HELDOUT,
    LEDGER,
    MODEL,
    POLICY,
    PRECISION,
    PROBE,
    PROJECTION,
    SEED,
    SOURCE,
    STEPS,
    TARGET,
    K,
    app,
    echo_data_free,
    fail,
    fitted_on_images,
    grid_of,
    load_model_json,
    local_flow_run,
    offline_prefect,
    report_of,
    user_errors,
    validation_message,
)


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
    fit_data: str = typer.Option(None, "--fit-data", help="Labelled images of every cell (S3 prefix or folder, not "
                                 "the --data images) to fit the projection on instead of prototypes."),
    max_forget_acc: float = typer.Option(None, "--max-forget-acc", help="Largest accuracy any forget cell may keep."),
    max_retain_drop: float = typer.Option(None, "--max-retain-drop", help="Largest accuracy drop of any retain cell."),
    max_probe_excess: float = PROBE,
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
    heldout_per_cell: int | None = HELDOUT,
    kind: str = PROJECTION,
    source: str = SOURCE,
) -> None:
    """Run the Prefect pipeline: fetch, unlearn, validate, and register the model in MLflow if it passes."""
    offline_prefect()  # first: Prefect's temporary server starts while the request is checked and torch loads
    import pydantic

    from clipforget.gate.verdict import Thresholds
    from clipforget.governance.request import SynthesisSettings, UnlearnRequest
    from clipforget.method.grid import check_projection_kind, forget_cells, parse_names

    cls_list, dom_list = parse_names(classes), parse_names(domains)
    try:
        fields: dict[str, Any] = {
            "mode": mode, "classes": cls_list, "domains": dom_list, "arch": model, "checkpoint_uri": checkpoint,
            "checkpoint_sha256": checkpoint_sha256, "grid": grid, "data_uri": data, "fit_uri": fit_data,
            "projection": kind,
            "source": source, "registered_name": registered_name, "promote": promote,
            "thresholds": Thresholds(max_forget_acc=max_forget_acc, max_retain_drop=max_retain_drop,
                                     mode_criteria=mode_criteria, max_probe_excess=max_probe_excess),
            "synthesis": SynthesisSettings(prototypes_per_cell=prototypes_per_cell, steps=steps,
                                           target_cosine=target_cosine, seed=seed, heldout_per_cell=heldout_per_cell,
                                           precision=precision)}
        if request_id:
            fields["request_id"] = request_id
        if requested_by:
            fields["requested_by"] = requested_by
        request = UnlearnRequest(**fields)
        if grid is not None or model == "toy":  # a bad request fails before any flow runs
            g = grid_of(grid, model, None)
            cells = forget_cells(g, mode, cls_list, dom_list)
            check_projection_kind(kind, cells, g.classes)
            if data is not None and "://" not in data:  # a local folder: checked now (an S3 prefix in the flow)
                from clipforget.method.data import check_labelled_folder

                check_labelled_folder(data, g)
    except pydantic.ValidationError as e:
        fail(ValueError(validation_message(e)))
    except user_errors() as e:
        fail(e)
    from flows.unlearn import unlearn

    json_out = json_out or Path("runs") / f"unlearn-{request.request_id}.json"
    json_out.unlink(missing_ok=True)  # a report from an earlier run of this request must not pass for this one
    with local_flow_run():
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
        echo_data_free(bool(report.get("heldout")))
        typer.echo(f"wrote {json_out}")
        return
    typer.echo(f"rejected, nothing registered: {report.get('rejected') or state.message}", err=True)
    echo_data_free(bool(report.get("heldout")), passed=False, fitted_on_images=fitted_on_images(report))
    typer.echo(f"wrote {json_out}")
    raise typer.Exit(1)


@app.command("govern")
def govern_cmd(
    policy_file: Path = POLICY,
    ledger: str = LEDGER,
    promote: bool = typer.Option(True, "--promote/--no-promote", help="Promote the version built for pending requests."),
    json_out: Path = typer.Option(None, "--json", help="Where to write the report (default runs/governance.json)."),
) -> None:
    """Run governance once: build pending ledger requests in one batch, audit the champion, write the report."""
    from clipforget.governance.request import ModelPolicy

    policy = load_model_json(ModelPolicy, policy_file, "policy")
    offline_prefect()
    from flows.governance import governance

    json_out = json_out or Path("runs") / "governance.json"
    json_out.unlink(missing_ok=True)
    with local_flow_run():
        state = governance(policy, ledger, promote, str(json_out), return_state=True)
    report = report_of(json_out, state)
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

    policy = load_model_json(ModelPolicy, policy_file, "policy")
    offline_prefect()
    from clipforget.governance.ledger import Ledger, LedgerError
    from flows.deletion_request import rebuild
    from tasks.record import ledger_location

    try:
        head = Ledger(ledger_location(ledger)).resolve(head) if head else None  # bad input fails before the flow
    except LedgerError as e:
        fail(e)
    with local_flow_run():
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
