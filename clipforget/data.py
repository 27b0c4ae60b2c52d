"""The one place that knows the labelled folder layout: root/<domain>/<class>/*.{png,jpg,jpeg}.

That is the layout of PACS and DomainNet, and what `clipforget toy render` writes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from clipforget.grid import Cell, Grid

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def cell_dir(root: str | Path, cell: Cell) -> Path:
    return Path(root) / cell.domain / cell.cls


def write_image(root: str | Path, cell: Cell, index: int, image: np.ndarray) -> Path:
    from PIL import Image

    path = cell_dir(root, cell) / f"{index}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


def list_labelled_images(root: str | Path, grid: Grid | None = None) -> list[tuple[Path, Cell]]:
    """Every image under root with its cell, sorted; checked against the grid when one is given."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"evaluation data folder not found: {root}")
    items: list[tuple[Path, Cell]] = []
    for dom in sorted(p for p in root.iterdir() if p.is_dir()):
        for cls in sorted(p for p in dom.iterdir() if p.is_dir()):
            files = sorted(f for f in cls.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            items.extend((f, Cell(cls.name, dom.name)) for f in files)
    if not items:
        raise ValueError(f"no images found under {root}; expected {root}/<domain>/<class>/*.png|jpg")
    if grid is not None:
        unknown = sorted({str(c) for _, c in items if c.cls not in grid.classes or c.domain not in grid.domains})
        if unknown:
            raise ValueError(f"{root} holds cells outside grid {grid.name!r}: {', '.join(unknown[:10])}")
    return items


def grid_of_folder(root: str | Path) -> Grid:
    """The grid spanned by a labelled folder's domain and class directory names."""
    items = list_labelled_images(root)
    classes = tuple(dict.fromkeys(sorted(c.cls for _, c in items)))
    domains = tuple(dict.fromkeys(sorted(c.domain for _, c in items)))
    return Grid(Path(root).name or "data", classes, domains)
