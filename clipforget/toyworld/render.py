"""Procedural renderer of the toy world: 10 shape classes in 4 PACS-like domains.

Every image is a pure function of (seed, domain, class, index), so a render can be reproduced
image by image and a different seed gives images never seen in training.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

CLASSES: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "heart",
    "cross", "arrow", "crescent", "house", "tree",
)
DOMAINS: tuple[str, ...] = ("photo", "painting", "cartoon", "sketch")
IMAGE_SIZE = 64

_PIXEL = 2.0 / IMAGE_SIZE  # one pixel in image units ([-1, 1] spans the image)
_lin = (np.arange(IMAGE_SIZE) + 0.5) * _PIXEL - 1.0
_X, _Y = np.meshgrid(_lin, -_lin)  # y points up
_GRID = np.stack([_X.ravel(), _Y.ravel()], axis=1)  # [H*W, 2]


def _star(points: int = 5, inner: float = 0.42) -> np.ndarray:
    angles = np.pi / 2 + np.arange(2 * points) * np.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles) - 0.08], axis=1)


def _heart(n: int = 48) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
    return np.stack([x, y + 2.5], axis=1) / 17.0


_POLYGONS: dict[str, list[np.ndarray]] = {
    "square": [np.array([(-0.78, -0.78), (0.78, -0.78), (0.78, 0.78), (-0.78, 0.78)])],
    "triangle": [np.array([(0.0, 0.95), (-0.95, -0.7), (0.95, -0.7)])],
    "star": [_star()],
    "heart": [_heart()],
    "cross": [np.array([
        (-0.28, 0.9), (0.28, 0.9), (0.28, 0.28), (0.9, 0.28), (0.9, -0.28), (0.28, -0.28),
        (0.28, -0.9), (-0.28, -0.9), (-0.28, -0.28), (-0.9, -0.28), (-0.9, 0.28), (-0.28, 0.28),
    ])],
    "arrow": [np.array([
        (-0.95, 0.17), (0.15, 0.17), (0.15, 0.55), (0.95, 0.0),
        (0.15, -0.55), (0.15, -0.17), (-0.95, -0.17),
    ])],
    "house": [np.array([
        (-0.62, -0.9), (0.62, -0.9), (0.62, 0.12), (0.85, 0.12), (0.0, 0.92),
        (-0.85, 0.12), (-0.62, 0.12),
    ])],
    "tree": [
        np.array([
            (-0.78, -0.42), (0.78, -0.42), (0.32, 0.18), (0.6, 0.18), (0.0, 0.95),
            (-0.6, 0.18), (-0.32, 0.18),
        ]),
        np.array([(-0.14, -0.95), (0.14, -0.95), (0.14, -0.42), (-0.14, -0.42)]),
    ],
}
# Shapes whose identity depends on orientation stay near upright.
_MAX_TILT = {"house": 0.35, "tree": 0.35, "heart": 0.5, "triangle": np.pi, "arrow": np.pi}


def _polygon_sdf(p: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Signed distance from points p [N,2] to polygon v [M,2]; negative inside. (x and y kept apart: the same
    arithmetic as on [N,M,2] arrays, bit for bit, without reductions over an axis of two.)"""
    ax, ay = v[:, 0], v[:, 1]
    by = np.roll(ay, -1)
    ex, ey = np.roll(ax, -1) - ax, by - ay  # edges a -> b
    px, py = p[:, 0:1], p[:, 1:2]
    wx, wy = px - ax, py - ay  # [N,M]
    t = np.clip((wx * ex + wy * ey) / (ex * ex + ey * ey), 0.0, 1.0)
    dx, dy = wx - t * ex, wy - t * ey
    d = np.sqrt((dx * dx + dy * dy).min(axis=1))  # sqrt is monotonic: the min of the roots is the root of the min
    crosses = (ay > py) != (by > py)
    x_at = ax + ex * (py - ay) / np.where(ey == 0, 1e-12, ey)
    inside = (crosses & (px < x_at)).sum(axis=1) % 2 == 1
    return np.where(inside, -d, d)


def shape_sdf(name: str, p: np.ndarray) -> np.ndarray:
    """Signed distance of a canonical shape (about [-1, 1]²) at points p [N,2]."""
    if name == "circle":
        return np.linalg.norm(p, axis=1) - 0.88
    if name == "crescent":
        outer = np.linalg.norm(p, axis=1) - 0.9
        bite = np.linalg.norm(p - np.array([0.42, 0.18]), axis=1) - 0.72
        return np.maximum(outer, -bite)
    return np.min(np.stack([_polygon_sdf(p, poly) for poly in _POLYGONS[name]]), axis=0)


def _smooth_noise(rng: np.random.Generator, cells: int) -> np.ndarray:
    """Bilinearly upsampled random field in [0, 1], shape [H, W]."""
    g = rng.random((cells + 1, cells + 1))
    s = np.linspace(0, cells, IMAGE_SIZE)
    i0 = np.minimum(s.astype(int), cells - 1)
    f = s - i0
    rows = g[i0] * (1 - f)[:, None] + g[i0 + 1] * f[:, None]
    return rows[:, i0] * (1 - f)[None] + rows[:, i0 + 1] * f[None]


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i])


_PALETTES = np.array([  # painterly palettes: ochre, umber, ultramarine, viridian, vermilion, ...
    [(0.80, 0.62, 0.25), (0.45, 0.30, 0.18), (0.20, 0.28, 0.55), (0.88, 0.80, 0.60)],
    [(0.70, 0.20, 0.15), (0.95, 0.75, 0.35), (0.25, 0.35, 0.25), (0.90, 0.88, 0.78)],
    [(0.25, 0.45, 0.60), (0.85, 0.70, 0.45), (0.55, 0.25, 0.35), (0.80, 0.85, 0.80)],
    [(0.35, 0.50, 0.30), (0.75, 0.55, 0.30), (0.30, 0.25, 0.45), (0.92, 0.85, 0.70)],
    [(0.60, 0.35, 0.55), (0.95, 0.80, 0.50), (0.20, 0.40, 0.45), (0.85, 0.80, 0.85)],
])


def _brush(rng: np.random.Generator, c1: np.ndarray, c2: np.ndarray) -> np.ndarray:
    """A field of parallel, wavering brush strokes mixing two colours, [H, W, 3]."""
    phi = rng.uniform(0, np.pi)
    freq = rng.uniform(10, 18)
    warp = _smooth_noise(rng, 4) * rng.uniform(3, 6)
    u = _X * np.cos(phi) + _Y * np.sin(phi)
    stroke = 0.5 + 0.5 * np.sin(u * freq + warp * np.pi)
    grain = _smooth_noise(rng, 16)
    mix = np.clip(0.65 * stroke + 0.35 * grain, 0, 1)[..., None]
    return c1 * (1 - mix) + c2 * mix


@dataclass(frozen=True)
class _Pose:
    angle: float
    scale: float
    shift: np.ndarray


def _pose(rng: np.random.Generator, name: str) -> _Pose:
    tilt = _MAX_TILT.get(name, np.pi)
    scale = rng.uniform(0.45, 0.78)
    return _Pose(rng.uniform(-tilt, tilt), scale, rng.uniform(-1, 1, 2) * (0.92 - scale) * 0.9)


def _sdf_image(name: str, pose: _Pose, jitter: np.ndarray | None = None) -> np.ndarray:
    c, s = np.cos(pose.angle), np.sin(pose.angle)
    p = (_GRID - pose.shift) / pose.scale
    p = p @ np.array([[c, -s], [s, c]])  # inverse rotation of the shape
    d = shape_sdf(name, p).reshape(IMAGE_SIZE, IMAGE_SIZE) * pose.scale
    return d if jitter is None else d + jitter


def _coverage(d: np.ndarray, soft: float = 1.0) -> np.ndarray:
    """Anti-aliased fill fraction from a signed distance image."""
    return np.clip(0.5 - d / (_PIXEL * soft), 0.0, 1.0)[..., None]


def _photo(rng: np.random.Generator, name: str) -> np.ndarray:
    pose = _pose(rng, name)
    d = _sdf_image(name, pose)
    bg1, bg2 = (_hsv(rng.random(), rng.uniform(0.1, 0.5), rng.uniform(0.35, 0.9)) for _ in range(2))
    phi = rng.uniform(0, 2 * np.pi)
    ramp = (0.5 + 0.5 * (_X * np.cos(phi) + _Y * np.sin(phi)) / 1.42)[..., None]
    bg = bg1 * (1 - ramp) + bg2 * ramp
    if rng.random() < 0.5:  # textured background
        bg = bg * (0.75 + 0.5 * _smooth_noise(rng, int(rng.integers(6, 20))))[..., None]
    shadow = _coverage(_sdf_image(name, _Pose(pose.angle, pose.scale, pose.shift + [0.06, -0.06])), 4.0)
    bg = bg * (1 - 0.45 * shadow)
    colour = _hsv(rng.random(), rng.uniform(0.4, 0.9), rng.uniform(0.5, 1.0))
    light = rng.uniform(0, 2 * np.pi)
    rel_x, rel_y = (_X - pose.shift[0]) / pose.scale, (_Y - pose.shift[1]) / pose.scale
    directional = 0.5 + 0.5 * np.clip(rel_x * np.cos(light) + rel_y * np.sin(light), -1, 1)
    depth = np.clip(-d / (0.25 * pose.scale), 0, 1)
    shade = (0.45 + 0.35 * directional + 0.25 * depth)[..., None]
    fill = np.clip(colour * shade, 0, 1)
    a = _coverage(d)
    return bg * (1 - a) + fill * a


def _painting(rng: np.random.Generator, name: str) -> np.ndarray:
    palette = _PALETTES[rng.integers(len(_PALETTES))]
    order = rng.permutation(4)
    jitter = (_smooth_noise(rng, 8) - 0.5) * 0.08
    d = _sdf_image(name, _pose(rng, name), jitter)
    bg = _brush(rng, palette[order[0]], palette[order[1]])
    c1, c2 = palette[order[2]], palette[order[3]] * 0.6 + palette[order[2]] * 0.4
    # keep the figure readable against the ground: a light ground gets a dark figure and vice versa
    if (palette[order[0]] + palette[order[1]]).mean() / 2 > 0.55:
        c1, c2 = c1 * 0.5, c2 * 0.5
    else:
        c1, c2 = 0.5 + 0.5 * c1, 0.5 + 0.5 * c2
    fill = _brush(rng, c1, c2)
    a = _coverage(d, 2.0)
    img = bg * (1 - a) + fill * a
    return img * (0.9 + 0.2 * _smooth_noise(rng, 32))[..., None]


def _cartoon(rng: np.random.Generator, name: str) -> np.ndarray:
    d = _sdf_image(name, _pose(rng, name))
    paper = _hsv(rng.random(), rng.uniform(0.1, 0.35), rng.uniform(0.85, 1.0))
    bg = np.broadcast_to(paper, (IMAGE_SIZE, IMAGE_SIZE, 3))
    fill = _hsv(rng.random(), rng.uniform(0.75, 1.0), rng.uniform(0.8, 1.0))
    width = rng.uniform(1.6, 2.8) * _PIXEL
    a = _coverage(d)
    outline = _coverage(np.abs(d + width / 2) - width / 2)
    img = bg * (1 - a) + fill * a
    return img * (1 - outline) + rng.uniform(0.0, 0.12) * outline


def _sketch(rng: np.random.Generator, name: str) -> np.ndarray:
    pose = _pose(rng, name)
    paper = rng.uniform(0.86, 0.98)
    img = paper + 0.05 * (_smooth_noise(rng, 32) - 0.5)
    ink = np.zeros((IMAGE_SIZE, IMAGE_SIZE))
    for _ in range(int(rng.integers(1, 4))):  # a few loose passes of the pencil
        wobble = (_smooth_noise(rng, 6) - 0.5) * rng.uniform(0.02, 0.07)
        d = _sdf_image(name, pose, wobble)
        width = rng.uniform(0.5, 1.2) * _PIXEL
        ink = np.maximum(ink, rng.uniform(0.5, 0.9) * _coverage(np.abs(d) - width)[..., 0])
    lead = rng.uniform(0.1, 0.3)
    gray = img * (1 - ink) + lead * ink
    tint = np.array([1.0, 1.0, 1.0]) + rng.uniform(-0.03, 0.03, 3)
    return gray[..., None] * tint


_DOMAIN_RENDERERS = {"photo": _photo, "painting": _painting, "cartoon": _cartoon, "sketch": _sketch}


def _check(name: str, domain: str) -> None:
    if name not in CLASSES:
        raise ValueError(f"unknown toy class {name!r}; expected one of {', '.join(CLASSES)}")
    if domain not in DOMAINS:
        raise ValueError(f"unknown toy domain {domain!r}; expected one of {', '.join(DOMAINS)}")


def render_image(name: str, domain: str, seed: int, index: int) -> np.ndarray:
    """One image of class `name` in `domain`, uint8 [64, 64, 3]; a pure function of its arguments."""
    _check(name, domain)
    rng = np.random.default_rng([seed, DOMAINS.index(domain), CLASSES.index(name), index])
    img = _DOMAIN_RENDERERS[domain](rng, name)
    img = img + rng.normal(0, 0.012, img.shape)  # sensor noise, so no two pixels repeat exactly
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def render_cells(
    cells: Iterable[tuple[str, str]], per_cell: int, seed: int
) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """Render `per_cell` images for each (class, domain) cell: uint8 [N, 64, 64, 3] and their cells."""
    images, labels = [], []
    for name, domain in cells:
        for i in range(per_cell):
            images.append(render_image(name, domain, seed, i))
            labels.append((name, domain))
    return np.stack(images), labels
