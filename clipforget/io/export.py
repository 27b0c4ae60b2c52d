"""Portable export: a registered model's folder (downloaded by the registry) → open_clip's hub layout.

The folder loads with plain open_clip, without clipforget or MLflow:
`open_clip.create_model_and_transforms("local-dir:DIR")`. It holds
- `open_clip_config.json`: `{"model_cfg": ..., "preprocess_cfg": ...}` (the architecture travels with the
  weights, so the toy model's config needs no registration);
- `open_clip_model.safetensors`: the unlearned weights (the projection already folded in);
- `README.md`: the model card (the same text as the MLflow model version's description);
- `zero_shot/classifier.safetensors` and `zero_shot/labels.json`: the zero-shot head the registered pyfunc uses
  (one normalized text embedding per class, and the class names), in a subfolder so open_clip's weight lookup
  never sees them.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

WEIGHTS_NAME = "open_clip_model.safetensors"  # open_clip's preferred name in a hub / local-dir folder
CONFIG_NAME = "open_clip_config.json"


def pyfunc_artifacts(model_dir: Path) -> dict[str, Path]:
    """The artifact paths of a downloaded pyfunc model folder (read from its MLmodel file)."""
    import yaml

    spec = yaml.safe_load((model_dir / "MLmodel").read_text())
    arts = spec["flavors"]["python_function"].get("artifacts") or {}
    return {k: model_dir / v["path"] for k, v in arts.items()}


def preprocess_config(arch_config: Path, weights: Path) -> dict[str, Any]:
    """The image preprocessing open_clip sets for this architecture (what the registered pyfunc uses)."""
    import open_clip

    arch = arch_config.stem
    if arch not in open_clip.list_models():
        open_clip.add_model_config(arch_config)
    model = open_clip.create_model(arch, pretrained=str(weights), weights_only=True)
    return dict(model.visual.preprocess_cfg)


def write_open_clip_folder(model_dir: Path, out: Path, card: str, info: Mapping[str, Any]) -> Path:
    """Write the open_clip folder for a downloaded registered model; returns `out`."""
    arts = pyfunc_artifacts(model_dir)
    missing = {"weights", "open_clip_config"} - set(arts)
    if missing:
        raise ValueError(f"{model_dir} is not a clipforget model: no {', '.join(sorted(missing))} artifact")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    model_cfg = json.loads(arts["open_clip_config"].read_text())
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_config(arts["open_clip_config"], arts["weights"])}
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    shutil.copyfile(arts["weights"], out / WEIGHTS_NAME)
    head = out / "zero_shot"
    for key in ("classifier", "labels"):
        if key in arts:
            head.mkdir(exist_ok=True)
            shutil.copyfile(arts[key], head / arts[key].name)
    (out / "README.md").write_text(readme(card, info))
    return out


def readme(card: str, info: Mapping[str, Any]) -> str:
    """The folder's README: hub front matter, the model card, and how to load it."""
    ref = f"models:/{info.get('name')}/{info.get('version')}"
    return "\n".join([
        "---",
        "library_name: open_clip",
        "tags: [clip, zero-shot-image-classification, machine-unlearning]",
        "---",
        "",
        card.rstrip(),
        "",
        "## This folder",
        "",
        f"Exported from `{ref}` (sha256 of the weights: `{info.get('sha256')}`). Load it with open_clip alone:",
        "",
        "```python",
        "import open_clip",
        "",
        'model, _, preprocess = open_clip.create_model_and_transforms("local-dir:PATH/TO/THIS/FOLDER")',
        'tokenizer = open_clip.get_tokenizer("local-dir:PATH/TO/THIS/FOLDER")',
        "```",
        "",
        "`zero_shot/` holds the classifier the registered model scores with: `classifier.safetensors` (one normalized "
        "text embedding per class, rows in the order of `labels.json`'s `classes`); logits are "
        "`model.logit_scale.exp() * normalize(model.encode_image(x)) @ classifier.T`.",
        "",
    ])
