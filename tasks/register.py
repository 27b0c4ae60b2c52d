"""Registration in the MLflow model registry (only ever called for a model that passed the gate)."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from clipforget.io import registry
from clipforget.method.grid import Grid


@task(name="find_registered", retries=2, retry_delay_seconds=5)
def find_registered(name: str, request_id: str) -> dict | None:
    """The version already registered for this request id, if any (re-runs register nothing new). A registration
    that was cut short (the process died after creating the version) is completed first."""
    mv = registry.find_version(name, request_id)
    if mv is None:
        return None
    if registry.finish(name, mv):
        get_run_logger().warning("%s version %s for request %s was cut short while registering: completed it "
                                 "(candidate alias, model card)", name, mv.version, request_id)
    return registry.show(f"{name}/{mv.version}")


def _example_image(path: str):
    import numpy as np
    from PIL import Image

    if path.endswith(".safetensors"):  # a held-out prototype bank file
        from safetensors import safe_open

        with safe_open(path, framework="np") as f:
            return f.get_tensor("images")[0]
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


# idempotent per request id, so a retry after a dropped connection cannot register twice
@task(name="register_model", retries=2, retry_delay_seconds=5)
def register_model(*, name: str, record: registry.Registration, grid: dict, unlearned: str, projection_file: str,
                   example: str, params: dict, report: dict, promote: bool, extra_tags: dict | None = None,
                   pictures: dict | None = None, base: dict | None = None) -> dict:
    """Log the pickle-free pyfunc of the checkpoint `unlearned`, register it under `name` with its model card and
    the record's tags (plus `extra_tags`), alias `candidate` (and `champion` on promotion); `pictures`
    ({name: PNG}) go to the run and are linked from the Prefect run. The pyfunc's zero-shot classifier comes from
    the text tower of `base` ({path, sha256}: the checkpoint `unlearned` was folded from, whose text tower it
    shares, already loaded in this process), else from `unlearned`'s."""
    from clipforget.io.checkpoints import load_model
    from clipforget.method.evaluate import ZeroShotClassifier
    from tasks.common import loaded_model
    from tasks.pictures import picture_artifacts

    logger = get_run_logger()
    g = Grid.from_dict(grid)
    model = loaded_model(record.arch, base["path"], base["sha256"]) if base else load_model(record.arch, unlearned)
    classifier = ZeroShotClassifier(model.model, model.tokenizer, g).weights
    workdir = Path(unlearned).parent / "package"
    artifacts = registry.package_model(workdir, Path(unlearned), record.arch, Path(projection_file),
                                       g.classes, classifier, grid)
    tags = {**record.tags(), **(extra_tags or {})}
    rv = registry.register(name, record.request_id, artifacts=artifacts, classes=g.classes,
                           example_image=_example_image(example), tags=tags, params=params, metrics=record.metrics,
                           report=report, promote=promote, pictures=pictures)
    if rv.created:
        picture_artifacts(record.request_id, registry.show(f"{name}/{rv.version}")["pictures"],
                          f"{name} version {rv.version}")
    logger.info("%s version %s of %s (aliases: %s)", "registered" if rv.created else "already registered as",
                rv.version, rv.name, ", ".join(rv.aliases) or "none")
    return rv.to_dict()


@task(name="promote_model", retries=2, retry_delay_seconds=5)
def promote_model(name: str, version: str) -> dict:
    """Move the `champion` alias to this version."""
    registry.promote(name, version)
    get_run_logger().info("%s version %s is now the champion", name, version)
    return registry.show(f"{name}/{version}")
