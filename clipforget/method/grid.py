"""The concept grid of (class, domain) cells and the three forgetting modes.

A request picks forget cells; every other cell of the grid is a retain cell.
- `global`: the chosen classes in every domain;
- `domain`: the chosen classes in the chosen domains only;
- `domain_complete`: every class in the chosen domains.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple, get_args

Mode = Literal["global", "domain", "domain_complete"]
MODES: tuple[str, ...] = get_args(Mode)
PRESETS_DIR = Path(__file__).parent / "grids"


class Cell(NamedTuple):
    cls: str
    domain: str

    def __str__(self) -> str:
        return f"{self.cls}/{self.domain}"


@dataclass(frozen=True)
class Grid:
    name: str
    classes: tuple[str, ...]
    domains: tuple[str, ...]

    def __post_init__(self) -> None:
        for what, names in (("class", self.classes), ("domain", self.domains)):
            if not names:
                raise ValueError(f"grid {self.name!r} has no {what} names")
            for n in names:
                # a cell is named "class/domain" and cells are joined by "," in tags and reports
                if not isinstance(n, str) or not n.strip() or n != n.strip() or any(c in n for c in "/,\\") \
                        or any(ord(c) < 32 or ord(c) == 127 for c in n) or len(n) > 200:
                    raise ValueError(f"grid {self.name!r} has a bad {what} name {n!r}: names are 1-200 characters "
                                     "without '/', ',', '\\', control characters or surrounding spaces")
            repeated = sorted({n for n in names if names.count(n) > 1})
            if repeated:
                raise ValueError(f"grid {self.name!r} repeats the {what} name(s) {', '.join(map(repr, repeated))}")

    @property
    def cells(self) -> list[Cell]:
        return [Cell(c, d) for d in self.domains for c in self.classes]

    def to_dict(self) -> dict:
        """{name, classes, domains}: how a grid travels between tasks and into reports and labels."""
        return {"name": self.name, "classes": list(self.classes), "domains": list(self.domains)}

    @classmethod
    def from_dict(cls, d: dict) -> Grid:
        return cls(d["name"], tuple(d["classes"]), tuple(d["domains"]))

    @classmethod
    def from_file(cls, path: str | Path) -> Grid:
        """JSON: {"classes": [...], "domains": [...]}."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            classes, domains = data["classes"], data["domains"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"cannot read grid file {path}: expected JSON with 'classes' and 'domains' lists "
                             f"({type(e).__name__}: {e})") from e
        if not isinstance(classes, list) or not isinstance(domains, list):
            raise ValueError(f"grid file {path}: 'classes' and 'domains' must be lists of names")
        try:
            return cls(path.stem, tuple(classes), tuple(domains))
        except ValueError as e:
            raise ValueError(f"grid file {path}: {e}") from e


def presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.json"))


def resolve_grid(spec: str) -> Grid:
    """A preset name (toy, pacs, domainnet) or the path of a grid JSON file."""
    if spec in presets():
        return Grid.from_file(PRESETS_DIR / f"{spec}.json")
    if Path(spec).is_file():
        return Grid.from_file(spec)
    raise ValueError(f"unknown grid {spec!r}: use a preset ({', '.join(presets())}) or a JSON file path")


def _check_names(kind: str, names: Sequence[str], known: Sequence[str]) -> None:
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown {kind} {', '.join(map(repr, unknown))}; this grid has: {', '.join(known)}")


def forget_cells(grid: Grid, mode: str, classes: Iterable[str] = (), domains: Iterable[str] = ()) -> list[Cell]:
    """The forget cells a request names, checked against the grid; raises ValueError on a bad request."""
    classes, domains = list(dict.fromkeys(classes)), list(dict.fromkeys(domains))
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    _check_names("class", classes, grid.classes)
    _check_names("domain", domains, grid.domains)
    if mode == "global":
        if not classes or domains:
            raise ValueError("mode 'global' forgets classes in every domain: give classes and no domains")
        cells = [Cell(c, d) for d in grid.domains for c in classes]
    elif mode == "domain":
        if not classes or not domains:
            raise ValueError("mode 'domain' forgets classes in chosen domains: give both classes and domains")
        cells = [Cell(c, d) for d in domains for c in classes]
    else:
        if classes or not domains:
            raise ValueError("mode 'domain_complete' forgets every class in chosen domains: give domains and no classes")
        cells = [Cell(c, d) for d in domains for c in grid.classes]
    if len(cells) == len(grid.cells):
        raise ValueError("the request forgets every cell of the grid; nothing would be retained")
    return cells


def check_projection_kind(kind: str | None, forget: Iterable[Cell], classes: Sequence[str]) -> None:
    """Raise ValueError when projection `kind` cannot express the forget set. Only the gated map is bound: it
    subtracts from an image of a domain the same multiple of each forgotten class's unique row whatever the image's
    class, which lowers each class's logit by the same amount on every image of that domain, so a forget set holding
    every class of a domain leaves the class lowered least with its images (measured with `domain_complete` on sketch:
    the held-out prototypes of 9 classes at 0.00, one class at 1.00). A map that can move each class toward another
    (the margin map) is not bound by this. Torch-free, so callers check before any model loads."""
    if kind != "gated":
        return
    fset = set(forget)
    whole = sorted(d for d in {c.domain for c in fset} if all(Cell(k, d) in fset for k in classes))
    if whole:
        raise ValueError(f"the gated projection cannot forget every class of a domain ({', '.join(whole)}): it lowers "
                         "each class's logit by the same amount on every image of the domain, so the class it lowers "
                         "least keeps its images; use the mode's default projection or the margin map")


def retain_cells(grid: Grid, forget: Iterable[Cell]) -> list[Cell]:
    gone = set(forget)
    return [c for c in grid.cells if c not in gone]


def parse_names(text: str | None) -> list[str]:
    """'a,b , c' -> ['a', 'b', 'c']."""
    return [t.strip() for t in (text or "").split(",") if t.strip()]
