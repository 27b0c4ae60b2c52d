"""`clipforget toy ...`, `eval` and `forget`: the method run in this process, without Prefect."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from flows.cli.common import (
    CHECKPOINT,
    DEVICE,
    GRID,
    HELDOUT,
    MODEL,
    PRECISION,
    PRETRAINED,
    PROBE,
    PROJECTION,
    SEED,
    SOURCE,
    STEPS,
    TARGET,
    TEMPLATES,
    K,
    UserError,
    app,
    bank,
    echo_data_free,
    fail,
    grid_of,
    load,
    progress_bar,
    synthesis_config,
    templates_of,
    toy_app,
    user_errors,
)


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
        fail(ValueError("--per-cell must be at least 1"))
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
    from clipforget.io.atomic import write_json
    from clipforget.method.evaluate import LabelledImages, ZeroShotClassifier, image_features
    from clipforget.runner import heldout_images

    if model_uri is not None:
        return _eval_registered(model_uri, data, json_out)
    try:
        g = grid_of(grid, model, data)
        prompts = templates_of(templates)
        loaded = load(model, checkpoint, pretrained, device)
        if data is not None:
            images = LabelledImages.from_folder(data, loaded.preprocess, g)
        else:
            cfg = synthesis_config(model, prototypes_per_cell, steps, target_cosine, seed, precision)
            images = heldout_images(loaded, g, cfg, prototypes_per_cell, prompts, progress=progress_bar(), bank=bank())
    except user_errors() as e:
        fail(e)
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
    fit_data: Path = typer.Option(None, "--fit-data", help="Labelled folder (images of every cell, not the --data "
                                  "images) to fit the projection on instead of prototypes, with the mode's image "
                                  "settings."),
    prototypes_per_cell: int = K,
    steps: int = STEPS,
    target_cosine: float = TARGET,
    seed: int = SEED,
    precision: str = PRECISION,
    heldout_per_cell: int | None = HELDOUT,
    kind: str = PROJECTION,
    source: str = SOURCE,
    max_probe_excess: float = PROBE,
    templates: Path = TEMPLATES,
    device: str = DEVICE,
) -> None:
    """Run the core method without orchestration: write the unlearned checkpoint and a report."""
    from clipforget.gate.verdict import Thresholds
    from clipforget.io.atomic import write_json
    from clipforget.method.grid import check_projection_kind, forget_cells, parse_names
    from clipforget.method.projection import default_config
    from clipforget.runner import run_forget

    cls_list, dom_list = parse_names(classes), parse_names(domains)
    try:
        if out.suffix != ".safetensors":
            raise UserError(f"--out must end in .safetensors, got {out.name}")
        g = grid_of(grid, model, data)
        cells = forget_cells(g, mode, cls_list, dom_list)  # a bad request fails before the model loads
        ns = default_config(mode, "images" if fit_data is not None else "prototypes", kind=kind, source=source)
        check_projection_kind(ns.kind, cells, g.classes)
        prompts = templates_of(templates)
        loaded = load(model, checkpoint, pretrained, device)
        result = run_forget(loaded, g, mode=mode, classes=cls_list, domains=dom_list,
                            synthesis=synthesis_config(model, prototypes_per_cell, steps, target_cosine, seed, precision),
                            nullspace=ns, out=out, data=data, heldout_per_cell=heldout_per_cell, templates=prompts,
                            progress=progress_bar(), bank=bank(), fit_data=fit_data,
                            thresholds=Thresholds(max_probe_excess=max_probe_excess))
    except user_errors() as e:
        fail(e)
    write_json(json_out, result.report)
    m = result.report["metrics"]
    typer.echo(f"forget accuracy {m['forget_before']:.3f} -> {m['forget_after']:.3f}; retain accuracy "
               f"{m['retain_before']:.3f} -> {m['retain_after']:.3f} (max cell drop {m['retain_max_cell_drop']:.3f})")
    if "probe_excess_after" in m:
        typer.echo(f"residual probe above chance {m['probe_excess_before']:.3f} -> {m['probe_excess_after']:.3f} "
                   "(worst forgotten cell vs its nearest kept cells)")
    typer.echo(f"{'approved' if result.report['passed'] else 'not approved: ' + str(result.report['rejected'])}")
    echo_data_free(data is None, passed=bool(result.report["passed"]), fitted_on_images=fit_data is not None)
    typer.echo(f"wrote {out} and {json_out}")


def _eval_registered(model_uri: str, data: Path | None, json_out: Path) -> None:
    from clipforget.io import registry
    from clipforget.io.atomic import write_json
    from clipforget.method.evaluate import score_cells

    try:
        if data is None:
            raise UserError("--model-uri needs --data: a registered model is evaluated on labelled images")
        labels, cells = registry.classify_folder(registry.load_pyfunc(model_uri), data)
    except user_errors() as e:
        fail(e)
    except Exception as e:  # the registry is unreachable, or no such model/alias
        fail(RuntimeError(f"cannot load {model_uri} from {registry.tracking_uri()}: {type(e).__name__}: {e}"))
    report = score_cells(labels, cells).to_dict()
    report.update({"model_uri": model_uri, "data": str(data)})
    write_json(json_out, report)
    typer.echo(f"accuracy {report['accuracy']:.4f} over {len(cells)} images in {len(report['cells'])} cells")
