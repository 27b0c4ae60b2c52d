"""Image embeddings of a checkpoint on prototype bank files, cached per checkpoint and file content.

The gate judges a data-free request on held-out prototypes that most requests share (the kept cells'), and the
base model's embeddings of them do not change between requests: they are computed once per checkpoint and bank
file and kept under `features/<checkpoint sha256>/`, keyed by the sha256 of the bank file's bytes (a bank file
pruned and synthesized again is a new key) and by where they were computed (device type and the model's dtype).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import torch

from clipforget.io.atomic import atomic_path
from clipforget.io.cache import touch


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def feature_path(root: str | Path, checkpoint_sha256: str, bank_file: str | Path, model: torch.nn.Module) -> Path:
    """Where the embeddings of `bank_file`'s images under `model` (the checkpoint `checkpoint_sha256`) are kept."""
    p = next(model.parameters())
    where = f"{p.device.type}-{str(p.dtype).removeprefix('torch.')}"
    return Path(root) / checkpoint_sha256 / f"{_file_sha256(Path(bank_file))[:32]}-{where}.safetensors"


def bank_image_features(loaded, checkpoint_sha256: str, bank_files: Sequence[str | Path], root: str | Path
                        ) -> torch.Tensor:
    """Unnormalized image embeddings [N, d] (float32) of the images of `bank_files` (rows in file order, as
    `clipforget.io.bank.load_prototypes` assembles them) under `loaded` (a LoadedModel of the checkpoint
    `checkpoint_sha256`), through the model's own preprocessing; computed for the files not cached yet, in one
    batch, then cached (each file written atomically)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from clipforget.method.evaluate import image_features, preprocess_arrays

    paths = [feature_path(root, checkpoint_sha256, f, loaded.model) for f in bank_files]
    have: dict[int, torch.Tensor] = {}
    for i, p in enumerate(paths):
        if p.is_file():
            with safe_open(str(p), framework="pt") as f:
                have[i] = f.get_tensor("features")
            touch(p)
    missing = [i for i in range(len(paths)) if i not in have]
    if missing:
        images = []
        for i in missing:
            with safe_open(str(bank_files[i]), framework="pt") as f:
                if "images" not in f.keys():  # noqa: SIM118 - safe_open has keys(), not __contains__
                    raise ValueError(f"bank file {bank_files[i]} holds no images (prototypes banked without them)")
                images.append(f.get_tensor("images"))
        pixels = preprocess_arrays(torch.cat(images), loaded.preprocess)
        feats = image_features(loaded.model, pixels).split([len(x) for x in images])
        for i, fi in zip(missing, feats, strict=True):
            with atomic_path(paths[i]) as tmp:
                save_file({"features": fi.contiguous()}, str(tmp),
                          metadata={"checkpoint_sha256": checkpoint_sha256, "bank_file": Path(bank_files[i]).name})
            have[i] = fi
    return torch.cat([have[i] for i in range(len(paths))]) if paths else torch.empty(0)
