"""Image embeddings of a checkpoint on prototype bank files and on labelled image folders, cached per checkpoint
and content.

The gate judges a data-free request on held-out prototypes that most requests share (the kept cells'), and a
request with evaluation images usually on the same images as the requests before it; the base model's embeddings
of either do not change between requests: they are computed once per checkpoint and content and kept under
`features/<checkpoint sha256>/`, keyed by the sha256 of the bank file's bytes (a bank file pruned and synthesized
again is a new key) or of the folder's listing and every image's bytes (an image added, removed, renamed or changed
is a new key), and by where they were computed (device type and the model's dtype).
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


def _where(model: torch.nn.Module) -> str:
    p = next(model.parameters())
    return f"{p.device.type}-{str(p.dtype).removeprefix('torch.')}"


def _load(path: Path) -> torch.Tensor | None:
    """Cached embeddings, or None when there are none (a hit counts as a use for the cache's pruning)."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        features = f.get_tensor("features")
    touch(path)
    return features


def _store(path: Path, features: torch.Tensor, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({"features": features.contiguous()}, str(tmp), metadata=metadata)


def feature_path(root: str | Path, checkpoint_sha256: str, bank_file: str | Path, model: torch.nn.Module) -> Path:
    """Where the embeddings of `bank_file`'s images under `model` (the checkpoint `checkpoint_sha256`) are kept."""
    return Path(root) / checkpoint_sha256 / f"{_file_sha256(Path(bank_file))[:32]}-{_where(model)}.safetensors"


def folder_image_features(loaded, checkpoint_sha256: str, folder: str | Path, grid, root: str | Path
                          ) -> tuple[torch.Tensor, list]:
    """Unnormalized image embeddings [N, d] (float32) of a labelled folder's images under `loaded` (a LoadedModel
    of the checkpoint `checkpoint_sha256`) and the cell of each, in the order of
    `clipforget.method.evaluate.LabelledImages.from_folder`. The folder passes that method's checks every time; its
    images are decoded and embedded only when this checkpoint has not embedded exactly these bytes under these
    names before (then cached, written atomically)."""
    from clipforget.method.data import check_labelled_folder
    from clipforget.method.evaluate import LabelledImages, image_features

    root_dir = Path(folder)
    items = check_labelled_folder(root_dir, grid)  # layout, grid, symlinks, every image's header: as from_folder
    h = hashlib.sha256(b"clipforget labelled folder v1\n")
    for path, cell in items:
        h.update(f"{path.relative_to(root_dir).as_posix()}\t{cell.cls}\t{cell.domain}\t{_file_sha256(path)}\n".encode())
    cells = [c for _, c in items]
    path = Path(root) / checkpoint_sha256 / f"folder-{h.hexdigest()[:32]}-{_where(loaded.model)}.safetensors"
    cached = _load(path)
    if cached is not None and len(cached) == len(items):
        return cached, cells
    features = image_features(loaded.model, LabelledImages.from_items(items, loaded.preprocess).pixels)
    _store(path, features, {"checkpoint_sha256": checkpoint_sha256, "images": str(len(items))})
    return features, cells


def bank_image_features(loaded, checkpoint_sha256: str, bank_files: Sequence[str | Path], root: str | Path
                        ) -> torch.Tensor:
    """Unnormalized image embeddings [N, d] (float32) of the images of `bank_files` (rows in file order, as
    `clipforget.io.bank.load_prototypes` assembles them) under `loaded` (a LoadedModel of the checkpoint
    `checkpoint_sha256`), through the model's own preprocessing; computed for the files not cached yet, in one
    batch, then cached (each file written atomically)."""
    from safetensors import safe_open

    from clipforget.method.evaluate import image_features, preprocess_arrays

    paths = [feature_path(root, checkpoint_sha256, f, loaded.model) for f in bank_files]
    have = {i: t for i, t in enumerate(map(_load, paths)) if t is not None}
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
            _store(paths[i], fi, {"checkpoint_sha256": checkpoint_sha256, "bank_file": Path(bank_files[i]).name})
            have[i] = fi
    return torch.cat([have[i] for i in range(len(paths))]) if paths else torch.empty(0)
