"""Pictures of an unlearning run: the per-cell accuracy heatmap before/after and a strip of prototypes.

Pure matplotlib (Agg), no orchestration: the tasks write these PNGs and log them to MLflow and Prefect.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def cell_heatmap(table: Sequence[Mapping[str, Any]], classes: Sequence[str], domains: Sequence[str], path: Path,
                 title: str) -> Path:
    """Zero-shot accuracy per cell (classes × domains), base and unlearned side by side; forget cells outlined."""
    import numpy as np
    from matplotlib.patches import Rectangle

    plt = _pyplot()
    ci = {c: i for i, c in enumerate(classes)}
    di = {d: j for j, d in enumerate(domains)}
    grids = {k: np.full((len(classes), len(domains)), np.nan) for k in ("before", "after")}
    forget = []
    for r in table:
        i, j = ci.get(r["class"]), di.get(r["domain"])
        if i is None or j is None:
            continue
        for k in grids:
            grids[k][i, j] = r[k]
        if r.get("role") == "forget":
            forget.append((i, j))
    height = max(3.0, 0.32 * len(classes) + 1.6)
    fig, axes = plt.subplots(1, 2, figsize=(max(6.0, 1.1 * len(domains) * 2 + 2.4), height), dpi=110,
                             constrained_layout=True)
    image = None
    for ax, (key, label) in zip(axes, (("before", "base"), ("after", "unlearned")), strict=True):
        image = ax.imshow(grids[key], vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_title(label, fontsize=9)
        ax.set_xticks(range(len(domains)), list(domains), rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(classes)), list(classes), fontsize=7)
        if len(classes) * len(domains) <= 120:
            for i in range(len(classes)):
                for j in range(len(domains)):
                    v = grids[key][i, j]
                    if not np.isnan(v):
                        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                                color="black" if v > 0.6 else "white")
        for i, j in forget:
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="#ff2a2a", linewidth=2.2))
    fig.colorbar(image, ax=list(axes), shrink=0.8, label="zero-shot accuracy")
    fig.suptitle(f"{title}\n(red outline: forgotten cells)", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def prototype_strip(images: Mapping[str, Any], path: Path, title: str) -> Path:
    """One row per forgotten cell: its synthesized prototypes (uint8 or float [N, H, W, 3] / [N, 3, H, W])."""
    import numpy as np

    plt = _pyplot()
    rows = [(cell, _as_hwc(imgs)) for cell, imgs in images.items() if len(imgs)]
    if not rows:
        raise ValueError("no prototype images to draw")
    cols = max(len(imgs) for _, imgs in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.3 * cols + 1.2, 1.3 * len(rows) + 0.6), dpi=110,
                             squeeze=False)
    for r, (cell, imgs) in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(imgs):
                ax.imshow(np.asarray(imgs[c]))
            else:
                ax.axis("off")
        axes[r][0].set_ylabel(cell, fontsize=7, rotation=0, ha="right", va="center")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _as_hwc(images: Any) -> Any:
    """uint8 [N, H, W, 3] from a tensor or array in [0, 1] or [0, 255], channels first or last."""
    import numpy as np

    arr = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    if arr.ndim == 4 and arr.shape[1] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(0, 2, 3, 1)
    if arr.dtype != np.uint8:
        arr = np.clip(arr * (255.0 if arr.max() <= 1.0 + 1e-6 else 1.0), 0, 255).astype(np.uint8)
    return arr
