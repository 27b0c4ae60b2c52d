"""The `clipforget` console command. Heavy imports happen inside each command."""

from __future__ import annotations

import json
from pathlib import Path

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Training- and data-free unlearning for CLIP.")
toy_app = typer.Typer(no_args_is_help=True, help="The toy world: renderer and toy model.")
app.add_typer(toy_app, name="toy")


@toy_app.command("train")
def toy_train(
    out: Path = typer.Option(Path("clipforget/toyworld/weights/toy.safetensors"), help="Where to write the weights."),
    steps: int = typer.Option(1100),
    batch_size: int = typer.Option(256),
    per_cell: int = typer.Option(1500, help="Pre-rendered training images per (class, domain) cell."),
    seed: int = typer.Option(0),
) -> None:
    """Train the toy CLIP model from scratch on rendered images (about 15 minutes on 2 CPU cores)."""
    from clipforget.toyworld.train import TrainConfig, train_toy_model

    summary = train_toy_model(out, TrainConfig(steps=steps, batch_size=batch_size, per_cell=per_cell, seed=seed),
                              progress=typer.echo)
    typer.echo(json.dumps(summary, indent=2))
