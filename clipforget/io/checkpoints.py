"""Loading CLIP models through open_clip's own factory, with the checkpoint's sha256 carried along.

The toy model is an ordinary open_clip config (`toy.json`) registered through `add_model_config`,
so every code path that serves `ViT-B-32` serves the toy model too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from clipforget.io.atomic import atomic_path

TOY_ARCH = "toy"
TOY_DIR = Path(__file__).parents[1] / "toyworld"
TOY_CONFIG = TOY_DIR / "toy.json"
TOY_WEIGHTS = TOY_DIR / "weights" / "toy.safetensors"


class ModelLoadError(RuntimeError):
    """A model or checkpoint could not be loaded; the message says why and what to do."""


def register_toy_config() -> None:
    import open_clip

    if TOY_ARCH not in open_clip.list_models():
        open_clip.add_model_config(TOY_CONFIG)


def check_arch(arch: str) -> None:
    """ModelLoadError unless open_clip knows `arch` (the toy config included)."""
    import open_clip

    register_toy_config()
    if arch not in open_clip.list_models():
        raise ModelLoadError(f"unknown open_clip architecture {arch!r}; see open_clip.list_models()")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(state: Mapping[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> str:
    """Write a safetensors state dict atomically (temp file + rename); returns its sha256."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp), metadata=metadata)
        canonical_metadata_order(tmp)
        return sha256_file(tmp)


def canonical_metadata_order(path: str | Path) -> None:
    """Sort a safetensors file's `__metadata__` keys in place, so equal tensors and metadata give equal bytes.

    safetensors writes metadata in hash-map order, which changes from one process to the next: without
    this a rebuilt checkpoint would not hash like the registered one. The header keeps its length (the same
    characters, reordered), so the tensor data does not move.
    """
    import json
    import struct

    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        raw = f.read(n)
        header = json.loads(raw)
        meta = header.get("__metadata__")
        if not meta or len(meta) < 2:
            return
        header["__metadata__"] = dict(sorted(meta.items()))
        out = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(out) > n:
            raise ValueError(f"{path}: canonical safetensors header is longer than the original ({len(out)} > {n})")
        f.seek(8)
        f.write(out + b" " * (n - len(out)))


def check_safetensors(path: str | Path) -> dict[str, Any]:
    """A safetensors file's header, checked against the file before any reader maps it: the header length,
    JSON, and every tensor's byte range inside the data (a truncated file or a forged header fails here)."""
    import json
    import struct

    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelLoadError(f"{path.name} is not a safetensors file: {size} bytes, too short for a header")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ModelLoadError(f"{path.name} is truncated or not a safetensors file: its header claims {n} bytes "
                                 f"but only {size - 8} follow")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            raise ModelLoadError(f"{path.name} is not a safetensors file: its header is not JSON") from None
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path.name} is not a safetensors file: its header is not a JSON object")
    data = size - 8 - n
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            start, stop = (int(x) for x in info["data_offsets"])
        except (TypeError, KeyError, ValueError):
            raise ModelLoadError(f"{path.name} is not a safetensors file: tensor {key!r} has no data offsets") from None
        if not 0 <= start <= stop <= data:
            raise ModelLoadError(f"{path.name} is truncated: tensor {key!r} needs bytes {start}-{stop} of the data, "
                                 f"the file holds {data}")
    return header


def _misfit(arch: str, checkpoint: str | Path | None) -> str | None:
    """For a safetensors file that did not load: which tensors are missing, unexpected or of another shape."""
    if checkpoint is None or not str(checkpoint).endswith(".safetensors"):
        return None
    import open_clip

    try:
        header = check_safetensors(checkpoint)
        want = {k: list(v.shape) for k, v in open_clip.create_model(arch).state_dict().items()}
    except Exception:
        return None
    have = {k: v["shape"] for k, v in header.items() if k != "__metadata__"}
    missing = [k for k in want if k not in have]
    unexpected = [k for k in have if k not in want]
    shape = [f"{k} {have[k]} vs {want[k]}" for k in want if k in have and have[k] != want[k]]
    parts = [f"{len(ks)} {what} ({', '.join(ks[:3])}{', ...' if len(ks) > 3 else ''})"
             for what, ks in (("missing tensor(s)", missing), ("unexpected tensor(s)", unexpected),
                              ("tensor(s) of another shape", shape)) if ks]
    return f"the state dict does not fit {arch}: " + "; ".join(parts) if parts else None


def pick_device(device: str | None = None) -> torch.device:
    """cuda when present, unless the caller names a device."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class LoadedModel:
    """An open_clip model ready for inference, and where its weights came from."""

    model: Any
    tokenizer: Any
    preprocess: Any
    arch: str
    checkpoint: str | None
    sha256: str | None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def load_model(
    arch: str,
    checkpoint: str | Path | None = None,
    pretrained: str | None = None,
    device: str | None = None,
) -> LoadedModel:
    """Build `arch` with open_clip and load weights from a local checkpoint or a `pretrained` tag.

    `arch="toy"` with no checkpoint loads the bundled toy weights. A local checkpoint is read as
    safetensors, or as a torch state dict with `weights_only=True` (never unpickled objects).
    """
    import open_clip

    check_arch(arch)
    if checkpoint is not None and pretrained is not None:
        raise ModelLoadError("give either a checkpoint file or a pretrained tag, not both")
    if arch == TOY_ARCH and checkpoint is None and pretrained is None:
        checkpoint = TOY_WEIGHTS
        if not TOY_WEIGHTS.is_file():
            raise ModelLoadError(f"the bundled toy weights are missing at {TOY_WEIGHTS}; run `clipforget toy train`")
    if pretrained is not None:
        checkpoint = _download_pretrained(arch, pretrained)

    sha = None
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise ModelLoadError(f"checkpoint not found: {path}")
        sha = sha256_file(path)
    name = Path(checkpoint).name if checkpoint is not None else "random weights"
    if checkpoint is not None and str(checkpoint).endswith(".safetensors"):
        check_safetensors(checkpoint)  # a truncated or forged header fails here, before any reader maps the file
    try:
        # open_clip reads safetensors, or torch state dicts with weights_only=True (no arbitrary unpickling)
        model, _, preprocess = open_clip.create_model_and_transforms(
            arch, pretrained=None if checkpoint is None else str(checkpoint), weights_only=True)
    except Exception as e:  # a wrong file for this architecture, or a pickle that is not a plain state dict
        if type(e).__name__ == "UnpicklingError":
            why = "it holds pickled Python objects, not a plain state dict; refused (only weights_only loading is allowed)"
        else:
            why = _misfit(arch, checkpoint) or \
                f"{type(e).__name__}: {' '.join(str(e).split())[:400]}"  # one line: state-dict errors span several
        raise ModelLoadError(f"cannot load {name} into {arch}: {why}") from None
    if checkpoint is not None:
        bad = [k for k, t in model.state_dict().items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:
            raise ModelLoadError(f"cannot load {name} into {arch}: {len(bad)} tensor(s) hold NaN or Inf values "
                                 f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})")
    model.float().eval().to(pick_device(device))
    tokenizer = open_clip.get_tokenizer(arch)
    return LoadedModel(model, tokenizer, preprocess, arch, None if checkpoint is None else str(checkpoint), sha)


def _download_pretrained(arch: str, tag: str) -> str:
    import open_clip
    from open_clip.pretrained import download_pretrained, get_pretrained_cfg

    cfg = get_pretrained_cfg(arch, tag)
    if not cfg:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(arch)) or "none"
        raise ModelLoadError(f"open_clip has no pretrained tag {tag!r} for {arch}; known tags: {tags}")
    try:
        return str(download_pretrained(cfg))
    except Exception as e:
        raise ModelLoadError(
            f"could not download pretrained weights {arch}/{tag}: the model hub is unreachable from here "
            f"({type(e).__name__}). Download the checkpoint where a hub is reachable and pass it as "
            "--checkpoint PATH (safetensors or a torch state dict)."
        ) from e
