"""The MLflow pyfunc model of a registered unlearned CLIP: zero-shot image classification.

Logged as "models from code": MLflow stores this file beside the artifacts and runs it at load, so
nothing is pickled. It imports only mlflow, torch, open_clip, safetensors, numpy, pandas and PIL —
a consumer needs no clipforget. Artifacts (see `registry.package_model`):
- `weights`: the unlearned checkpoint (safetensors, projection already folded in);
- `open_clip_config`: `<arch>.json`, the open_clip model config (registered if open_clip lacks it);
- `classifier`: one normalized text embedding per class (safetensors), from the domain-ensembled prompts;
- `labels`: JSON with the class names (classifier row order) and the grid;
- `projection`: the projection P that was folded (safetensors; for audit, not applied again).

Input: a DataFrame with an `image` column of encoded image bytes (PNG/JPEG; base64 strings are
accepted too). Output: a DataFrame with `label`, `score` (its probability) and one probability
column per class.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel


class ZeroShotCLIP(PythonModel):
    def load_context(self, context) -> None:
        import open_clip
        import torch
        from safetensors.torch import load_file

        cfg_path = Path(context.artifacts["open_clip_config"])
        arch = cfg_path.stem
        if arch not in open_clip.list_models():
            open_clip.add_model_config(cfg_path)
        # the weights load while the model is created (not into a randomly initialized one afterwards)
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=context.artifacts["weights"],
                                                                     weights_only=True)
        self.model = model.float().eval()
        self.preprocess = preprocess
        self.classifier = load_file(context.artifacts["classifier"])["classifier"].float()
        labels = json.loads(Path(context.artifacts["labels"]).read_text())
        self.classes = list(labels["classes"])
        self.logit_scale = float(model.logit_scale.detach().exp()) if hasattr(model, "logit_scale") else 100.0
        self._torch = torch

    def _image(self, value):
        from PIL import Image

        if isinstance(value, str):
            value = base64.b64decode(value)
        if isinstance(value, (bytes, bytearray)):
            return Image.open(io.BytesIO(value)).convert("RGB")
        if isinstance(value, np.ndarray):
            return Image.fromarray(value.astype(np.uint8)).convert("RGB")
        raise TypeError(f"cannot read an image from {type(value).__name__}; send encoded PNG/JPEG bytes")

    # type hints: MLflow validates the input against the logged signature (a DataFrame with an `image` column)
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        torch = self._torch
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame({"image": list(model_input)})
        if "image" not in frame.columns:
            raise ValueError("expected a column named 'image' with encoded image bytes")
        pixels = torch.stack([self.preprocess(self._image(v)) for v in frame["image"]])
        with torch.no_grad():
            feats = torch.nn.functional.normalize(self.model.encode_image(pixels).float(), dim=-1)
            probs = (self.logit_scale * feats @ self.classifier.T).softmax(-1).numpy().astype(np.float64)
        best = probs.argmax(1)
        out = pd.DataFrame({"label": [self.classes[i] for i in best], "score": probs[np.arange(len(best)), best]})
        for j, name in enumerate(self.classes):
            out[name] = probs[:, j]
        return out


set_model(ZeroShotCLIP())
