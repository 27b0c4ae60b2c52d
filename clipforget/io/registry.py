"""The MLflow model registry: the one place that knows MLflow tag names, aliases and the model package.

An approved unlearned model is logged as a pickle-free pyfunc (`pyfunc_model.py`, models from code:
safetensors weights + open_clip config + classifier + projection), registered under the request's
name with tags that say where it came from and how it measured, and given the alias `candidate`
(`champion` too on promotion). A request id is registered at most once per name: asking again
returns the existing version.

Tracking URI: `MLFLOW_TRACKING_URI`, else `sqlite:///mlflow.db` with artifacts in `./mlruns`.
"""

from __future__ import annotations

import functools
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from clipforget.io.card import model_card

T = TypeVar("T")

PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
EXPERIMENT = "clipforget"
CANDIDATE, CHAMPION = "candidate", "champion"

# version tags
TAG_REQUEST_ID = "clipforget.request_id"
TAG_REQUEST_DIGEST = "clipforget.request_digest"  # of the request's content: one id, one request
TAG_REQUESTED_BY = "clipforget.requested_by"
TAG_MODE = "clipforget.mode"
TAG_FORGET_CELLS = "clipforget.forget_cells"
TAG_BASE_SHA256 = "clipforget.base_sha256"
TAG_SHA256 = "clipforget.sha256"  # of the unlearned checkpoint
TAG_ARCH = "clipforget.arch"
TAG_GRID = "clipforget.grid"
TAG_METRIC_PREFIX = "clipforget.metric."
# versions built from a deletion-request ledger
TAG_LEDGER = "clipforget.ledger"  # where the ledger lives (folder or s3:// prefix)
TAG_LEDGER_HEAD = "clipforget.ledger_head"  # hash of the newest entry the version covers
TAG_LEDGER_SEQ = "clipforget.ledger_seq"  # its sequence number
TAG_REQUEST_IDS = "clipforget.request_ids"  # every request id the version covers, comma-separated
TAG_PICTURES = "clipforget.pictures"  # name=artifact path of the run's pictures, comma-separated
TAG_PASSED = "clipforget.passed"  # on runs of rejected builds: "false"
# operator actions on the `champion` alias (clipforget models promote / rollback)
TAG_PROMOTION_REASON = "clipforget.promotion_reason"
TAG_ROLLED_BACK = "clipforget.rolled_back"  # on a version moved off `champion` by a rollback: the reason
# MLflow tags a run with the tracking username (MLFLOW_TRACKING_USERNAME) as `mlflow.user`: a credential stays out
RUN_USER = {"mlflow.user": "clipforget"}
MAX_TAG_VALUE = 5000  # MLflow's limit on a tag value


_URI_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


def _restores_mlflow_uris(fn: Callable[..., T]) -> Callable[..., T]:
    """MLflow's fluent API (runs, model logging, artifact downloads) is pointed at a server by process-wide setters,
    which also export MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI for subprocesses. Put both back after `fn`: a registry
    call must not redirect what the process does next (a later MlflowClient without a registry URI follows them)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        from mlflow.tracking._model_registry import utils as registry_utils
        from mlflow.tracking._tracking_service import utils as tracking_utils

        saved = tracking_utils._tracking_uri, registry_utils._registry_uri, {k: os.environ.get(k) for k in _URI_ENV}
        try:
            return fn(*args, **kwargs)
        finally:
            tracking_utils._tracking_uri, registry_utils._registry_uri = saved[0], saved[1]
            for k, v in saved[2].items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    return wrapper


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def client(uri: str | None = None) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri or tracking_uri(), registry_uri=uri or tracking_uri())


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    created: bool  # False when the request id was registered before and nothing new was made
    aliases: list[str]
    model_uri: str  # models:/NAME/VERSION

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True, kw_only=True)
class Registration:
    """What an approved build records about itself in the registry: the version's tags are made from it."""

    request_id: str  # the version's idempotency key: one request id, one version
    request_digest: str  # of the request's content
    requested_by: str
    arch: str
    grid: str  # the grid's name
    mode: str
    forget_cells: tuple[str, ...]
    base_sha256: str
    sha256: str  # of the unlearned checkpoint
    metrics: Mapping[str, float]

    def tags(self) -> dict[str, str]:
        tags = {TAG_REQUEST_ID: self.request_id, TAG_REQUEST_DIGEST: self.request_digest,
                TAG_REQUESTED_BY: self.requested_by, TAG_MODE: self.mode,
                TAG_FORGET_CELLS: ",".join(self.forget_cells)[:MAX_TAG_VALUE], TAG_BASE_SHA256: self.base_sha256,
                TAG_SHA256: self.sha256, TAG_ARCH: self.arch, TAG_GRID: self.grid}
        tags.update({f"{TAG_METRIC_PREFIX}{k}": f"{v:.6g}" for k, v in self.metrics.items()
                     if isinstance(v, (int, float))})
        return tags


def find_version(name: str, request_id: str, uri: str | None = None) -> Any | None:
    """The version of `name` registered for `request_id`, if any."""
    from mlflow.exceptions import MlflowException

    c = client(uri)
    try:
        c.get_registered_model(name)
    except MlflowException:
        return None
    found = c.search_model_versions(f"name = '{_quote(name)}' and tags.`{TAG_REQUEST_ID}` = '{_quote(request_id)}'")
    return min(found, key=lambda v: int(v.version)) if found else None


def recorded_settings(name: str, request_id: str, uri: str | None = None) -> dict[str, dict[str, str]] | None:
    """The synthesis and projection settings the version of `name` registered for `request_id` was built with: its
    run's `synthesis.*` and `nullspace.*` parameters (as MLflow keeps them, strings), or None without such a version."""
    mv = find_version(name, request_id, uri)
    if mv is None or not mv.run_id:
        return None
    out: dict[str, dict[str, str]] = {"synthesis": {}, "nullspace": {}}
    for key, value in client(uri).get_run(mv.run_id).data.params.items():
        group, _, setting = key.partition(".")
        if group in out and setting:
            out[group][setting] = value
    return out if any(out.values()) else None


def _quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace("'", "\\'")


def package_model(workdir: Path, checkpoint: Path, arch: str, projection: Path, classes: Sequence[str],
                  classifier: Any, grid: Mapping[str, Any]) -> dict[str, str]:
    """Write the pyfunc artifacts (besides the weights and projection, which exist) and return their map."""
    import open_clip
    from safetensors.torch import save_file

    from clipforget.io.checkpoints import register_toy_config

    clash = {"label", "score", "image"} & set(classes)
    if clash:
        raise ValueError(f"class names {sorted(clash)} clash with the pyfunc's output columns")
    register_toy_config()
    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise ValueError(f"open_clip has no config for {arch!r}")
    workdir.mkdir(parents=True, exist_ok=True)
    cfg_path = workdir / f"{arch}.json"
    cfg_path.write_text(json.dumps(cfg, indent=2))
    clf_path = workdir / "classifier.safetensors"
    save_file({"classifier": classifier.float().contiguous()}, str(clf_path))
    proj_path = workdir / "projection.safetensors"
    shutil.copyfile(projection, proj_path)
    labels = workdir / "labels.json"
    labels.write_text(json.dumps({"classes": list(classes), "grid": dict(grid)}, indent=2))
    return {"weights": str(checkpoint), "open_clip_config": str(cfg_path), "classifier": str(clf_path),
            "labels": str(labels), "projection": str(proj_path)}


def signature(classes: Sequence[str]) -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    outputs: list[Any] = [ColSpec("string", "label"), ColSpec("double", "score")] + [ColSpec("double", c) for c in classes]
    return ModelSignature(inputs=Schema([ColSpec("binary", "image")]), outputs=Schema(outputs))


def encode_png(image: Any) -> bytes:
    """uint8 [H, W, 3] → PNG bytes, the pyfunc's input format."""
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def pip_requirements() -> list[str]:
    """Pinned to what built the model; given explicitly so MLflow need not load the model to infer them."""
    from importlib.metadata import version

    pins = [f"{pkg}=={version(pkg)}" for pkg in ("mlflow", "open_clip_torch", "safetensors", "pillow", "numpy",
                                                 "pandas")]
    return [f"torch=={version('torch').split('+')[0]}", *pins]


@_restores_mlflow_uris
def register(
    name: str,
    request_id: str,
    *,
    artifacts: Mapping[str, str],
    classes: Sequence[str],
    example_image: Any,
    tags: Mapping[str, str],
    params: Mapping[str, Any],
    metrics: Mapping[str, float],
    report: Mapping[str, Any],
    promote: bool = False,
    uri: str | None = None,
    pictures: Mapping[str, str | Path] | None = None,
) -> RegisteredVersion:
    """Log the pyfunc in an MLflow run, register it under `name` with its model card as the version's description,
    and set aliases (idempotent per request id). `pictures` ({name: PNG path}) go to the run's `pictures/`."""
    import mlflow
    import pandas as pd

    uri = uri or tracking_uri()
    existing = find_version(name, request_id, uri)
    if existing is not None:
        if finish(name, existing, uri) and promote:  # a retry of this registration, cut short before its aliases
            client(uri).set_registered_model_alias(name, CHAMPION, str(existing.version))
        return _described(name, existing.version, created=False, uri=uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    mlflow.set_experiment(EXPERIMENT)
    with mlflow.start_run(run_name=f"unlearn-{request_id}", tags={**tags, **RUN_USER}) as run:
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
        mlflow.log_dict(dict(report), "report.json")
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PYFUNC_CODE),
            artifacts=dict(artifacts),
            signature=signature(classes),
            input_example=pd.DataFrame({"image": [encode_png(example_image)]}),
            pip_requirements=pip_requirements(),
        )
        for path in (pictures or {}).values():
            mlflow.log_artifact(str(path), PICTURES_DIR)
        run_id = str(run.info.run_id)
    c = client(uri)
    links = picture_links(run_id, pictures or {}, uri)
    mv_tags = {**tags, TAG_PICTURES: ",".join(f"{k}={PICTURES_DIR}/{Path(p).name}" for k, p in (pictures or {}).items())}
    mv = mlflow.register_model(info.model_uri, name, tags={k: v for k, v in mv_tags.items() if v})
    first = find_version(name, request_id, uri)
    if first is not None and str(first.version) != str(mv.version):
        # another run registered this request id at the same moment: the lowest version wins, this one goes
        c.delete_model_version(name, mv.version)
        c.delete_run(run_id)
        finish(name, first, uri)
        return _described(name, first.version, created=False, uri=uri)
    c.set_registered_model_alias(name, CANDIDATE, mv.version)
    if promote:
        c.set_registered_model_alias(name, CHAMPION, mv.version)
    # the model card, written last: what consumers read on the model page without opening artifacts, and the
    # mark of a registration that went to its end (`finish` completes one that was cut short)
    c.update_model_version(name, mv.version, description=model_card(report, name, str(mv.version), links))
    return _described(name, mv.version, created=True, uri=uri)


def finish(name: str, mv: Any, uri: str | None = None) -> bool:
    """Complete a registration that was cut short (the process died after the version was created): alias it
    `candidate` and write its model card from the report logged with its run. A version with a model card went
    to its end and is left as it is. Returns whether anything was done."""
    if mv.description:
        return False
    from mlflow.exceptions import MlflowException

    c = client(uri)
    try:
        with tempfile.TemporaryDirectory(prefix="clipforget-report-") as tmp:
            data = json.loads(Path(c.download_artifacts(mv.run_id, "report.json", tmp)).read_text())
    except (MlflowException, OSError, ValueError):  # no report logged with it: a card of what the tags say
        data = {}
    c.set_registered_model_alias(name, CANDIDATE, str(mv.version))
    c.update_model_version(name, str(mv.version), description=model_card(
        data, name, str(mv.version), _pictures_of(mv, dict(mv.tags or {}))))
    return True


PICTURES_DIR = "pictures"


def artifact_url(run_id: str, path: str, uri: str | None = None) -> str:
    """Where a person opens a run's artifact: the tracking server's download route for an http(s) server
    (the MLflow UI's own link), else the artifact's location in the local store."""
    from urllib.parse import quote

    uri = uri or tracking_uri()
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/get-artifact?path={quote(path)}&run_uuid={run_id}"
    return f"{client(uri).get_run(run_id).info.artifact_uri.rstrip('/')}/{path}"


def picture_links(run_id: str, pictures: Mapping[str, str | Path], uri: str | None = None) -> dict[str, str]:
    """{name: URL} of pictures logged under `pictures/` of a run."""
    return {k: artifact_url(run_id, f"{PICTURES_DIR}/{Path(p).name}", uri) for k, p in pictures.items()}


@_restores_mlflow_uris
def log_rejected(request_id: str, tags: Mapping[str, str], report: Mapping[str, Any],
                 pictures: Mapping[str, str | Path], uri: str | None = None) -> tuple[str, dict[str, str]]:
    """A run for a build the gate rejected (nothing is registered): its report and pictures. (run id, links)"""
    import mlflow

    uri = uri or tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(EXPERIMENT)
    with mlflow.start_run(run_name=f"rejected-{request_id}", tags={**tags, TAG_PASSED: "false", **RUN_USER}) as run:
        mlflow.log_dict(dict(report), "report.json")
        for path in pictures.values():
            mlflow.log_artifact(str(path), PICTURES_DIR)
        run_id = str(run.info.run_id)
    return run_id, picture_links(run_id, pictures, uri)


def promote(name: str, version: str, uri: str | None = None) -> None:
    client(uri).set_registered_model_alias(name, CHAMPION, str(version))


def _described(name: str, version: str, created: bool, uri: str | None) -> RegisteredVersion:
    mv = client(uri).get_model_version(name, str(version))
    return RegisteredVersion(name, str(mv.version), created, sorted(getattr(mv, "aliases", []) or []),
                             f"models:/{name}/{mv.version}")


def parse_model_ref(ref: str) -> tuple[str, str | None, str | None]:
    """'NAME', 'NAME@alias', 'NAME/version' or 'models:/NAME@alias' → (name, alias, version)."""
    ref = ref.removeprefix("models:/")
    if "@" in ref:
        name, alias = ref.rsplit("@", 1)
        return name, alias, None
    if "/" in ref and ref.rsplit("/", 1)[1].isdigit():
        name, version = ref.rsplit("/", 1)
        return name, None, version
    return ref, None, None


def _version_dict(mv: Any) -> dict:
    tags = dict(mv.tags or {})
    return {
        "version": str(mv.version),
        "aliases": sorted(getattr(mv, "aliases", []) or []),
        "status": mv.status,
        "created": mv.creation_timestamp,
        "request_id": tags.get(TAG_REQUEST_ID),
        "request_digest": tags.get(TAG_REQUEST_DIGEST),
        "requested_by": tags.get(TAG_REQUESTED_BY),
        "mode": tags.get(TAG_MODE),
        "forget_cells": (tags.get(TAG_FORGET_CELLS) or "").split(",") if tags.get(TAG_FORGET_CELLS) else [],
        "base_sha256": tags.get(TAG_BASE_SHA256),
        "sha256": tags.get(TAG_SHA256),
        "ledger_head": tags.get(TAG_LEDGER_HEAD),
        "request_ids": (tags.get(TAG_REQUEST_IDS) or "").split(",") if tags.get(TAG_REQUEST_IDS) else [],
        "metrics": {k[len(TAG_METRIC_PREFIX):]: float(v) for k, v in tags.items() if k.startswith(TAG_METRIC_PREFIX)},
        "run_id": getattr(mv, "run_id", None),
        "pictures": _pictures_of(mv, tags),
        "tags": tags,
    }


def _pictures_of(mv: Any, tags: Mapping[str, str]) -> dict[str, str]:
    """{name: URL} of the pictures logged with a version's run (from its `clipforget.pictures` tag)."""
    if not tags.get(TAG_PICTURES) or not getattr(mv, "run_id", None):
        return {}
    pairs = (item.split("=", 1) for item in tags[TAG_PICTURES].split(",") if "=" in item)
    return {k: artifact_url(mv.run_id, path) for k, path in pairs}


def list_models(uri: str | None = None) -> list[dict]:
    """Every registered model with its versions' count and aliases."""
    out = []
    for rm in client(uri).search_registered_models():
        aliases = dict(getattr(rm, "aliases", {}) or {})
        latest = max((int(v.version) for v in (rm.latest_versions or [])), default=None)
        out.append({"name": rm.name, "latest_version": latest, "aliases": aliases,
                    "description": rm.description or ""})
    return out


def show(ref: str, uri: str | None = None) -> dict:
    """A registered model (all versions) or one version (NAME@alias, NAME/version) with its tags."""
    c = client(uri)
    name, alias, version = parse_model_ref(ref)
    if alias is not None:
        return {"name": name, **_version_dict(c.get_model_version_by_alias(name, alias))}
    if version is not None:
        return {"name": name, **_version_dict(c.get_model_version(name, version))}
    rm = c.get_registered_model(name)
    versions = sorted(c.search_model_versions(f"name = '{_quote(name)}'"), key=lambda v: int(v.version))
    aliases = dict(getattr(rm, "aliases", {}) or {})
    by_version: dict[str, list[str]] = {}
    for a, v in aliases.items():
        by_version.setdefault(str(v), []).append(a)
    rows = []
    for v in versions:
        d = _version_dict(v)
        d["aliases"] = sorted(by_version.get(str(v.version), []))
        rows.append(d)
    return {"name": name, "aliases": aliases, "versions": rows}


@_restores_mlflow_uris
def load_pyfunc(model_uri: str, uri: str | None = None) -> Any:
    """A registered model as MLflow pyfunc (`models:/NAME@alias`, `models:/NAME/version`, runs:/...).

    The model's files are downloaded into a temporary folder that is removed once the model is loaded (its
    `load_context` reads every artifact into memory): `mlflow.pyfunc.load_model` alone leaves a copy of the
    weights in the system's temporary folder at every call."""
    import mlflow

    mlflow.set_tracking_uri(uri or tracking_uri())
    mlflow.set_registry_uri(uri or tracking_uri())
    with tempfile.TemporaryDirectory(prefix="clipforget-pyfunc-") as tmp:
        return mlflow.pyfunc.load_model(model_uri, dst_path=tmp)


def classify_folder(pyfunc: Any, root: str | Path, batch_size: int = 256) -> tuple[list[str], list[Any]]:
    """Predicted labels for every image of a labelled folder, and each image's cell."""
    import pandas as pd

    from clipforget.method.data import list_labelled_images

    items = list_labelled_images(root)
    labels: list[str] = []
    for i in range(0, len(items), batch_size):
        frame = pd.DataFrame({"image": [p.read_bytes() for p, _ in items[i : i + batch_size]]})
        labels += list(pyfunc.predict(frame)["label"])
    return labels, [c for _, c in items]


def champion(name: str, uri: str | None = None) -> dict | None:
    """The version holding the `champion` alias, or None when there is none (or no such model)."""
    from mlflow.exceptions import MlflowException

    try:
        return show(f"{name}@{CHAMPION}", uri)
    except MlflowException as e:
        if getattr(e, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def versions(name: str, uri: str | None = None) -> list[dict]:
    """Every version of `name` with its tags, oldest first ([] when the model is not registered)."""
    from mlflow.exceptions import MlflowException

    try:
        return show(name, uri)["versions"]
    except MlflowException as e:
        if getattr(e, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
            return []
        raise


@_restores_mlflow_uris
def download_weights(name: str, version: str, dst: Path, uri: str | None = None) -> Path:
    """The registered version's unlearned checkpoint, downloaded from the artifact store into `dst`."""
    import mlflow
    import yaml

    mlflow.set_tracking_uri(uri or tracking_uri())
    mlflow.set_registry_uri(uri or tracking_uri())
    root = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(dst)))
    spec = yaml.safe_load((root / "MLmodel").read_text())
    return root / spec["flavors"]["python_function"]["artifacts"]["weights"]["path"]


GOVERNANCE_EXPERIMENT = "clipforget-governance"


@_restores_mlflow_uris
def log_governance(report: Mapping[str, Any], markdown: str, plot: Path | None, uri: str | None = None) -> str:
    """An MLflow run in the `clipforget-governance` experiment holding the compliance report; its run id."""
    import mlflow

    uri = uri or tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(GOVERNANCE_EXPERIMENT)
    champ = report.get("champion") or {}
    tags = {"clipforget.kind": "governance", "clipforget.registered_name": str(report["registered_name"]),
            "clipforget.compliant": str(bool(report["passed"])).lower(),
            TAG_LEDGER_HEAD: str(report["ledger"].get("head") or ""),
            "clipforget.champion_version": str(champ.get("version") or "")}
    with mlflow.start_run(run_name=f"governance-{report['registered_name']}", tags={**tags, **RUN_USER}) as run:
        mlflow.log_text(markdown, "governance/report.md")
        mlflow.log_dict(dict(report), "governance/report.json")
        if plot is not None:
            mlflow.log_artifact(str(plot), "governance")
        mlflow.log_metrics({"findings": float(len(report["findings"])), "compliant": float(bool(report["passed"]))})
        return str(run.info.run_id)


@_restores_mlflow_uris
def download_model(ref: str, dst: Path, uri: str | None = None) -> tuple[dict, Path]:
    """A registered version (NAME@alias, NAME/version, models:/...) and its model folder downloaded into `dst`."""
    import mlflow

    info = show(ref if ref.startswith("models:/") else f"models:/{ref}", uri)
    if "versions" in info:
        raise ValueError(f"{ref}: name a version or an alias (NAME@champion, NAME/3)")
    mlflow.set_tracking_uri(uri or tracking_uri())
    mlflow.set_registry_uri(uri or tracking_uri())
    root = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{info['name']}/{info['version']}",
                                               dst_path=str(dst))
    info["description"] = client(uri).get_model_version(info["name"], info["version"]).description or ""
    return info, Path(root)


# --- operator actions on `champion`: never a version that does not cover the whole ledger ---

class PromotionRefused(ValueError):
    """The version does not cover the whole ledger (or there is no version to roll back to)."""


def coverage_gap(version: Mapping[str, Any], ledger_ids: Sequence[str], ledger_head: str | None) -> str | None:
    """Why `version` does not cover the ledger (None when it covers every request up to the current head)."""
    if not ledger_ids:
        return None
    missing = [r for r in ledger_ids if r not in (version.get("request_ids") or [])]
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        return f"version {version['version']} was not built for request(s) {shown}"
    if ledger_head and version.get("ledger_head") != ledger_head:
        return (f"version {version['version']} was built for ledger head {str(version.get('ledger_head'))[:16]}…, "
                f"not the current head {ledger_head[:16]}…")
    return None


def promote_checked(name: str, version: str, ledger_ids: Sequence[str], ledger_head: str | None, reason: str = "",
                    uri: str | None = None) -> dict:
    """Move `champion` to `version` if it covers the ledger; the reason is recorded as a version tag."""
    target = show(f"{name}/{version}", uri)
    gap = coverage_gap(target, ledger_ids, ledger_head)
    if gap:
        raise PromotionRefused(f"refusing to make {name} version {version} the champion: {gap}")
    c = client(uri)
    c.set_registered_model_alias(name, CHAMPION, str(version))
    c.set_model_version_tag(name, str(version), TAG_PROMOTION_REASON, (reason or "promoted by hand")[:MAX_TAG_VALUE])
    return show(f"{name}/{version}", uri)


def rollback(name: str, ledger_ids: Sequence[str], ledger_head: str | None, reason: str,
             uri: str | None = None) -> tuple[dict, dict]:
    """Move `champion` back to the newest older version that covers the whole ledger and was never rolled back.
    The reason is tagged on both versions. Returns (previous champion, new champion)."""
    current = champion(name, uri)
    if current is None:
        raise PromotionRefused(f"{name} has no champion to roll back")
    older = [v for v in versions(name, uri) if int(v["version"]) < int(current["version"])]
    why: list[str] = []
    for v in sorted(older, key=lambda v: -int(v["version"])):
        gap = coverage_gap(v, ledger_ids, ledger_head)
        if v["tags"].get(TAG_ROLLED_BACK):
            gap = f"version {v['version']} was rolled back before ({v['tags'][TAG_ROLLED_BACK]})"
        if v.get("status") not in (None, "READY"):
            gap = f"version {v['version']} is {v['status']}"
        if gap is None:
            c = client(uri)
            c.set_model_version_tag(name, current["version"], TAG_ROLLED_BACK, reason[:MAX_TAG_VALUE])
            c.set_registered_model_alias(name, CHAMPION, v["version"])
            c.set_model_version_tag(name, v["version"], TAG_PROMOTION_REASON,
                                    f"rollback from version {current['version']}: {reason}"[:MAX_TAG_VALUE])
            return current, show(f"{name}/{v['version']}", uri)
        why.append(gap)
    raise PromotionRefused(f"no version of {name} older than the champion (version {current['version']}) covers the "
                           f"whole ledger: " + ("; ".join(why) if why else "there is none"))
