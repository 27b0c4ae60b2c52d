"""The one place that knows the labelled folder layout: root/<domain>/<class>/*.{png,jpg,jpeg}.

That is the layout of PACS and DomainNet, and what `clipforget toy render` writes.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from clipforget.method.grid import Cell, Grid

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def cell_dir(root: str | Path, cell: Cell) -> Path:
    return Path(root) / cell.domain / cell.cls


def write_image(root: str | Path, cell: Cell, index: int, image: np.ndarray) -> Path:
    from PIL import Image

    path = cell_dir(root, cell) / f"{index}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


MIN_SIDE = 8  # pixels; a smaller image carries no class or domain
MAX_PIXELS = 40_000_000  # e.g. 8000 x 5000; beyond it an image is a decompression bomb, not evaluation data


def _inside(root: Path, path: Path) -> None:
    """A symlink may point anywhere; evaluation data must stay inside its folder."""
    if not path.resolve().is_relative_to(root.resolve()):
        raise ValueError(f"{path} points outside the evaluation data folder {root} (to {path.resolve()})")


def require_every_cell(present: Iterable[Cell], grid: Grid, what: str = "the fit images") -> None:
    """ValueError naming the cells of `grid` that have no image: a projection is fitted on every cell, forgotten
    and kept."""
    have = set(present)
    missing = [str(c) for c in grid.cells if c not in have]
    if missing:
        raise ValueError(f"{what} have no images for {len(missing)} of {len(grid.cells)} cells of grid "
                         f"{grid.name!r} ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); the "
                         "projection is fitted on every cell, forgotten and kept")


def list_labelled_images(root: str | Path, grid: Grid | None = None) -> list[tuple[Path, Cell]]:
    """Every image under root with its cell, sorted; checked against the grid when one is given.

    Files and folders that resolve outside root (symlinks) are refused, so a folder cannot make the
    pipeline read other files of the machine."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"evaluation data folder not found: {root}")
    items: list[tuple[Path, Cell]] = []
    for dom in sorted(p for p in root.iterdir() if p.is_dir()):
        _inside(root, dom)
        for cls in sorted(p for p in dom.iterdir() if p.is_dir()):
            _inside(root, cls)
            files = sorted(f for f in cls.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            for f in files:
                _inside(root, f)
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


def verify_images(items: list[tuple[Path, Cell]]) -> None:
    """Open every image's header and check its data: a file that is not an image, a corrupt or truncated one,
    one too small to show anything or a decompression bomb fails here, naming the file, before any work."""
    import warnings

    from PIL import Image

    for path, _ in items:
        size: tuple[int, int] | None = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit below names the size
                with Image.open(path) as im:
                    size = im.size
                    if size[0] * size[1] <= MAX_PIXELS and min(size) >= MIN_SIDE:
                        im.verify()  # chunk checksums (PNG) and structure, without decoding the pixels
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBomb*, struct.error, ...
            raise ValueError(f"image {path} is not a readable image: {type(e).__name__}: "
                             f"{' '.join(str(e).split())[:200]}") from None
        assert size is not None
        w, h = size
        if w * h > MAX_PIXELS:
            raise ValueError(f"image {path} is {w}x{h} pixels; the limit is {MAX_PIXELS} pixels")
        if min(w, h) < MIN_SIDE:
            raise ValueError(f"image {path} is {w}x{h} pixels; images need at least {MIN_SIDE}x{MIN_SIDE}")


def check_labelled_folder(root: str | Path, grid: Grid | None = None) -> list[tuple[Path, Cell]]:
    """The checks a labelled folder must pass before it is used: layout, grid, symlinks, every image's bytes."""
    items = list_labelled_images(root, grid)
    verify_images(items)
    return items
