"""Data-free visual prototypes (docs/DESIGN.md, step 3).

For each cell, K images are synthesized from noise by maximizing the cosine between their image
embedding and the cell's text embedding. Each image is a sigmoid of a blurred low-resolution start plus
a full-resolution residual (the low-resolution part finds the shape, the residual the texture); every
step sees a random scale/shift/flip and pixel noise, so the result is an image the model recognizes
robustly rather than an adversarial pattern. An image stops as soon as its clean embedding reaches the
target cosine.

Batch layout: a fixed number of slots is optimized at once, and a finished image hands its slot to the
next one waiting, so the batch stays full until the queue runs dry (early-stopped images do not leave
holes). Each image carries its own Adam state, step count and learning-rate schedule.

Reproducible: each image's start and augmentations come from its own generator seeded by (seed, cell,
index), and nothing in its optimization depends on the other images in the batch, so a cell's
prototypes do not depend on which other cells were synthesized with it.

Precision: `precision="auto"` runs bf16 autocast only where bf16 is native (CUDA with bf16 support; CPUs
with AVX512-BF16 or AMX) and fp32 elsewhere: on an AVX2-only CPU bf16 autocast is about 15x slower. On a CPU with
native bf16 it also measures the model (`measured_cpu_precision`): ViT-B-32 runs 2.5-3.5x faster in fp32 there.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any, Literal

import torch
import torch.nn.functional as F

from clipforget.method.grid import Cell
from clipforget.method.preprocess import image_normalizer, image_size

Precision = Literal["auto", "fp32", "bf16"]
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), read from the kernel's CPU flags.

    torch must also be dispatching at that level: under `ATEN_CPU_CAPABILITY=avx2` (or a build without
    AVX512 kernels) the bf16 flags are there but torch's kernels do not use them.
    """
    capability = torch.backends.cpu.get_cpu_capability().upper()
    if not capability.startswith(("AVX512", "AMX")):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return "AMX" in torch.backends.cpu.get_cpu_capability().upper()


def resolve_precision(precision: str, device: torch.device | str, model: Any = None) -> Literal["fp32", "bf16"]:
    """The precision synthesis runs at: `auto` picks bf16 only where the hardware does it natively, and on a CPU
    with native bf16, given the model, only if a short measurement does not find fp32 clearly faster for it
    (`measured_cpu_precision`: native bf16 instructions do not make every model faster)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision  # type: ignore[return-value]
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        if model is not None and measures_model(precision, device):
            return measured_cpu_precision(model)
        return "bf16" if cpu_has_native_bf16() else "fp32"
    return "fp32"


def measures_model(precision: str, device: torch.device | str) -> bool:
    """Whether deciding `precision` on `device` measures the model: `auto` on a CPU with native bf16 (a caller
    that would load the model only for this asks first)."""
    return precision == "auto" and torch.device(device).type == "cpu" and cpu_has_native_bf16()


# fp32 must be this much faster than bf16 before `auto` leaves bf16 on a CPU with native bf16: far beyond the noise
# of a two-step measurement, so one machine decides the same way every time (the bank keys hold the precision)
FP32_OVER_BF16 = 1.5
MEASURED_RUNS = 3  # timed runs per precision, taking turns
_MEASURED: dict[tuple, dict[str, Any]] = {}


def _model_key(model: Any) -> tuple:
    return (type(model).__name__, sum(p.numel() for p in model.parameters()), image_size(model),
            torch.backends.cpu.get_cpu_capability(), torch.get_num_threads())


def measured_cpu_precision(model: Any, batch: int = 4) -> Literal["fp32", "bf16"]:
    """fp32 or bf16 for synthesizing with `model` on this CPU: image-steps/s of the synthesis step (forward and
    backward to the input, channels-last) in both, measured once per model shape and process; bf16 unless fp32 is
    `FP32_OVER_BF16` times faster. On a 2-core AVX512-BF16 CPU (no AMX), at batch 4: the toy model bf16 171 against
    fp32 170 image-steps/s (bf16 kept; at its synthesis batch of 128 bf16 is 1.6x faster), ViT-B-32 bf16 1.8 against
    fp32 6.4 (fp32 chosen; docs/BENCHMARKS.md)."""
    key = _model_key(model)
    if key not in _MEASURED:
        size = image_size(model)
        x = torch.rand(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
        requires = [p.requires_grad for p in model.parameters()]
        for p in model.parameters():
            p.requires_grad_(False)
        best = {"fp32": float("inf"), "bf16": float("inf")}
        try:
            # the two precisions take turns (fp32, bf16, bf16, fp32, ...) and each keeps its fastest run: a burst of
            # load from another process slows both alike, or at most some runs of one, and cannot flip the choice
            # (measured one after the other, a busy moment during the second precision's runs did: the same request
            # then resolved to another precision, another bank key, other prototypes)
            for i in range(MEASURED_RUNS + 1):  # the first round builds kernels and is not timed
                for precision in ("fp32", "bf16") if i % 2 == 0 else ("bf16", "fp32"):
                    xi = x.clone().requires_grad_()
                    t = time.perf_counter()
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                        out = model.encode_image(xi).float().sum()
                    out.backward()
                    if i:
                        best[precision] = min(best[precision], time.perf_counter() - t)
            rates = {k: batch / v for k, v in best.items()}
        finally:
            for p, r in zip(model.parameters(), requires, strict=True):
                p.requires_grad_(r)
        choice = "fp32" if rates["fp32"] >= FP32_OVER_BF16 * rates["bf16"] else "bf16"
        _MEASURED[key] = {"choice": choice, "image_steps_per_s": {k: round(v, 1) for k, v in rates.items()}}
    return _MEASURED[key]["choice"]


def measurement_record(model: Any) -> dict[str, Any]:
    """What `measured_cpu_precision` decided for `model` in this process (measuring it if it has not), as JSON-able
    data that `restore_measurement` puts back in another process on the same machine."""
    choice = measured_cpu_precision(model)
    key = _model_key(model)
    return {"key": list(key), "choice": choice, "image_steps_per_s": _MEASURED[key]["image_steps_per_s"]}


def restore_measurement(record: dict[str, Any]) -> Literal["fp32", "bf16"]:
    """Take a `measurement_record` made earlier on this machine as this process's measurement of that model (it is
    reported as measured, and not measured again); returns its choice."""
    if record.get("choice") not in ("fp32", "bf16") or not isinstance(record.get("key"), list):
        raise ValueError(f"not a precision measurement: {record!r}")
    key = tuple(record["key"])
    _MEASURED[key] = {"choice": record["choice"], "image_steps_per_s": dict(record.get("image_steps_per_s", {}))}
    return record["choice"]


def machine_fingerprint() -> dict[str, str]:
    """What a precision measurement holds for: this CPU (model name, capability, native bf16), torch's threads and
    torch's version."""
    name = ""
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return {"cpu": name or platform.processor() or platform.machine(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_native_bf16": str(cpu_has_native_bf16()),
            "torch_threads": str(torch.get_num_threads()), "torch": torch.__version__}


def hardware_summary(device: torch.device | str = "cpu") -> dict[str, str]:
    """What decides the precision, for logs and reports (with the measurements `auto` made in this process)."""
    device = torch.device(device)
    out = {"device": str(device), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "cpu_native_bf16": str(cpu_has_native_bf16()), "torch_threads": str(torch.get_num_threads())}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    if device.type == "cpu" and _MEASURED:
        out["measured_image_steps_per_s"] = "; ".join(
            f"{k[0]} ({k[1]} parameters): fp32 {m['image_steps_per_s']['fp32']}, bf16 {m['image_steps_per_s']['bf16']}"
            for k, m in _MEASURED.items())
    return out


TOY_TARGET_COSINE = 0.77  # the toy model's image and text embeddings align closely
OPEN_CLIP_TARGET_COSINE = 0.30  # pretrained CLIP: matched image-text pairs score around 0.3


def default_target_cosine(arch: str) -> float:
    """The early-stop cosine of synthesis when a request names none: it depends on how the model aligns."""
    return TOY_TARGET_COSINE if arch == "toy" else OPEN_CLIP_TARGET_COSINE


@dataclass(frozen=True)
class SynthesisConfig:
    prototypes_per_cell: int = 8
    # defaults chosen by steps to the target on the toy model (docs/BENCHMARKS.md, "convergence"): a larger step,
    # less momentum, a quieter full-resolution residual and half the augmentation reach the target in a
    # median of ~40 steps where the first settings (lr 0.08, beta1 0.9, residual 1, augment 1) needed > 300
    steps: int = 150
    target_cosine: float = TOY_TARGET_COSINE
    seed: int = 0
    lr: float = 0.2
    low_res: int = 16
    check_every: int = 10
    batch_size: int = 128  # images optimized at once (slots refilled as images finish)
    precision: str = "auto"  # auto | fp32 | bf16; the bank key holds the resolved one
    augment: float = 0.5  # strength of the zoom (±7.5%), shift (±6%) and pixel-noise augmentation
    high_scale: float = 0.1  # step size of the full-resolution residual relative to the low-resolution start
    augment_decay: float = 0.0  # 1: augmentation fades out with the learning rate; 0: constant
    beta1: float = 0.5  # Adam's momentum: images stop early, so a short memory converges faster
    # the index of a cell's first prototype (each image is seeded by seed, cell and index): prototypes_per_cell=10,
    # first_index=10 are the images 10-19 of prototypes_per_cell=20 (held-out prototypes come in such blocks)
    first_index: int = 0
    # weight of a feature-statistics prior (DeepInversion-style, per image): each batch-norm layer's input, standardized
    # by the layer's running statistics, should have mean 0 and mean square 1 over the image; 0: off. Only models
    # with batch norm (the toy model, ResNet CLIPs) have such statistics; elsewhere the prior is absent
    bn_prior: float = 0.0

    def __post_init__(self) -> None:
        if self.prototypes_per_cell < 1 or self.steps < 1:
            raise ValueError("prototypes_per_cell and steps must be at least 1")
        if self.first_index < 0:
            raise ValueError("first_index must be at least 0")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; expected one of {', '.join(PRECISIONS)}")

    def resolved(self, device: torch.device | str, model: Any = None) -> SynthesisConfig:
        """This config with `precision` decided for `device` and, on a CPU with native bf16, `model` (what runs,
        and what the bank keys: decide with the model before looking anything up)."""
        return replace(self, precision=resolve_precision(self.precision, device, model))


@dataclass
class Prototypes:
    """Normalized image embeddings [N, d] of synthesized images, row i belonging to cells[i]."""

    embeddings: torch.Tensor
    cells: list[Cell]
    cosines: torch.Tensor  # final clean cosine to the cell's text target
    steps_used: torch.Tensor  # optimization steps each image took
    seconds: float
    config: SynthesisConfig
    images: torch.Tensor | None = None  # uint8 [N, H, W, 3] when asked for

    def for_cell(self, cell: Cell) -> torch.Tensor:
        idx = [i for i, c in enumerate(self.cells) if c == cell]
        return self.embeddings[idx]

    @property
    def reached(self) -> torch.Tensor:
        return self.cosines >= self.config.target_cosine

    def summary(self) -> dict[str, float | str]:
        return {
            "prototypes": len(self.cells),
            "mean_cosine": float(self.cosines.mean()),
            "reached_target": float(self.reached.float().mean()),
            "mean_steps": float(self.steps_used.float().mean()),
            "median_steps": float(self.steps_used.float().median()),
            "seconds": round(self.seconds, 2),
            "precision": self.config.precision,
        }


# the settings of each image: entries that differ only in these can share one batch (`synthesize(configs=...)`)
PER_IMAGE_SETTINGS = ("seed", "augment", "augment_decay", "prototypes_per_cell", "first_index")


def shared_settings(config: SynthesisConfig) -> SynthesisConfig:
    """`config` with its per-image settings blanked: what entries of one batch must have in common."""
    return replace(config, seed=0, augment=0.0, augment_decay=0.0, prototypes_per_cell=1, first_index=0)


def cell_seed(seed: int, cell: Cell, index: int) -> int:
    """A stable 63-bit seed for one prototype image (independent of Python's hash randomization)."""
    digest = hashlib.sha256(f"{seed}|{cell.cls}|{cell.domain}|{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _augment_params(u: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
    """Per image: scale, shift x, shift y, flip, noise std [B, 5], from uniform draws u [B, 5] and a strength [B]."""
    s = strength[:, None]
    out = torch.empty_like(u)
    out[:, 0:1] = 1.0 + s * 0.3 * (u[:, 0:1] - 0.5)  # zoom
    out[:, 1:3] = (u[:, 1:3] - 0.5) * 0.25 * s  # shift, in [-1, 1] image units
    out[:, 3] = (u[:, 3] < 0.5).float()
    out[:, 4:5] = 0.03 * s * u[:, 4:5]
    return out


def _augment(x: torch.Tensor, p: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Apply per-image zoom/shift/flip (one grid_sample) and pixel noise; x [B,3,H,W] in [0,1]."""
    b = x.shape[0]
    theta = torch.zeros(b, 2, 3, device=x.device)
    sx = (1.0 / p[:, 0]) * (1 - 2 * p[:, 3])  # flip = negative x scale
    theta[:, 0, 0], theta[:, 1, 1] = sx, 1.0 / p[:, 0]
    theta[:, 0, 2], theta[:, 1, 2] = p[:, 1], p[:, 2]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    y = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return y + noise * p[:, 4, None, None, None]


Progress = Callable[[dict], None]


def format_progress(p: dict, width: int = 24) -> str:
    """One line for a person: a bar of images done, the step, the mean cosine and the time left."""
    done, total = p["done"], p["total"]
    filled = int(width * done / total) if total else width
    eta = p.get("eta", float("nan"))
    eta_s = f"ETA {eta:.0f} s" if eta == eta else "ETA -"  # NaN until the first image is done
    return (f"prototypes [{'#' * filled}{'.' * (width - filled)}] {done}/{total} done, {p['active']} active, "
            f"step {p['step']}/{p['steps']}, mean cosine {p['mean_cosine']:.3f}, {p['elapsed']:.0f} s, {eta_s}")


class _Slots:
    """The images being optimized: parameters, per-image Adam state and step counts, one row per slot."""

    def __init__(self, n: int, low_res: int, size: int, steps: int, device: torch.device) -> None:
        self.low = torch.zeros(n, 3, low_res, low_res, device=device)
        self.high = torch.zeros(n, 3, size, size, device=device)
        self.m = [torch.zeros_like(self.low), torch.zeros_like(self.high)]
        self.v = [torch.zeros_like(self.low), torch.zeros_like(self.high)]
        self.t = torch.zeros(n, dtype=torch.long)
        self.row = torch.full((n,), -1, dtype=torch.long)  # which image a slot holds; -1 = empty
        self.aug = torch.zeros(n, steps, 5)
        self.noise = torch.zeros(n, 3, size, size, device=device)


def synthesize(
    model: Any,
    targets: torch.Tensor,
    cells: Sequence[Cell],
    config: SynthesisConfig = SynthesisConfig(),
    progress: Progress | None = None,
    return_images: bool = False,
    on_cells_done: Callable[[Prototypes], object] | None = None,
    configs: Sequence[SynthesisConfig] | None = None,
) -> Prototypes:
    """Synthesize `config.prototypes_per_cell` prototypes for each cell.

    `targets` [n_cells, d] are the normalized text embeddings to match, row j for cells[j]. The model is
    used as it is (its device, eval mode) and left unchanged. `on_cells_done` receives the prototypes of
    each group of cells as soon as all their images are finished (to bank them before the rest is done:
    an interrupted run keeps what it finished). `progress` receives a dict about every `check_every` steps.
    `configs[j]`, when given, are cells[j]'s own settings; they may differ from `config` only in the settings of each
    image (`PER_IMAGE_SETTINGS`: seed, augmentation, how many and which images), so that blocks of one cell's images
    (the held-out sets, `clipforget.runner.heldout_blocks`: a cell appears once per block, with its own `first_index`)
    and a request's projection prototypes can share one batch; `on_cells_done` then receives the cells of each
    distinct setting with that setting as their config (the bank keys each by it). Every image has its own seed,
    augmentation, noise and step schedule, so what else shares the batch reaches it only through the kernels: a batch
    of another size may run other kernels (measured with one thread: 6 and 12 images agree bit for bit, 36 do not,
    about 1e-4 apart in an embedding after 5 steps), and over many steps such a difference can move an image's
    stopping step. The same missing cells give the same bits; the same cell among other missing cells gives an
    equivalent draw, not the same bits. The returned `Prototypes` carry `config` (resolved) whatever their entries'
    settings.
    """
    if targets.shape[0] != len(cells):
        raise ValueError(f"{targets.shape[0]} targets for {len(cells)} cells")
    device = next(model.parameters()).device
    config = config.resolved(device, model)
    if configs is None:
        cfgs = [config] * len(cells)
    else:
        if len(configs) != len(cells):
            raise ValueError(f"configs must give one setting for each of the {len(cells)} cells")
        cfgs = [c.resolved(device, model) for c in configs]
        if any(shared_settings(c) != shared_settings(config) for c in cfgs):
            raise ValueError("entries synthesized in one batch may differ only in "
                             f"{', '.join(PER_IMAGE_SETTINGS)}")
    if len(set(zip(cells, cfgs, strict=True))) != len(cells):
        raise ValueError("a cell appears twice with the same settings: its images would be synthesized twice")
    t0 = time.perf_counter()
    sizes = [c.prototypes_per_cell for c in cfgs]
    offsets = [0, *itertools.accumulate(sizes)][:-1]  # entry j's first row
    rows = [(cell, j, cfgs[j].first_index + i) for j, cell in enumerate(cells) for i in range(sizes[j])]
    # per entry: the augmentation strength and how much of it fades with the step size
    aug_base = torch.tensor([c.augment for c in cfgs], dtype=torch.float32)
    aug_decay = torch.tensor([c.augment_decay for c in cfgs], dtype=torch.float32)
    n = len(rows)
    size = image_size(model)
    normalize = image_normalizer(model)
    tgt_all = targets.to(device).float()
    low_out = torch.zeros(n, 3, config.low_res, config.low_res, device=device)
    high_out = torch.zeros(n, 3, size, size, device=device)
    steps_used = torch.full((n,), config.steps, dtype=torch.long)
    finished = torch.zeros(n, dtype=torch.bool)
    cell_left = list(sizes)  # images of each entry not yet finished
    done_cells: list[int] = []
    emitted = 0
    slots = _Slots(min(config.batch_size, n), config.low_res, size, config.steps, device)
    next_row = 0
    b1, b2, eps = config.beta1, 0.999, 1e-8
    mean_cos = float("nan")
    last_report = t0
    autocast = config.precision == "bf16"
    bn_inputs: list[torch.Tensor] = []
    bn_layers = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) and m.running_var is not None] \
        if config.bn_prior > 0 else []

    def bn_hook(module: torch.nn.BatchNorm2d, args: tuple) -> None:
        mean, var = module.running_mean, module.running_var
        assert mean is not None and var is not None  # bn_layers holds only layers with running statistics
        bn_inputs.append((args[0].float() - mean[:, None, None]) * torch.rsqrt(var[:, None, None] + module.eps))

    def bn_loss() -> torch.Tensor:
        """Per image: over the batch-norm layers, the mean over channels of mean² + (mean square − 1)²."""
        per = [z.mean(dim=(2, 3)).pow(2).mean(1) + (z.pow(2).mean(dim=(2, 3)) - 1).pow(2).mean(1) for z in bn_inputs]
        bn_inputs.clear()
        return torch.stack(per).mean(0)
    channels_last = device.type == "cpu"  # about 1.7x faster convolutions on CPU (bench/synthesis.py)

    def images(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(F.interpolate(lo, size=size, mode="bicubic", align_corners=False) + hi)

    def quantized(x: torch.Tensor) -> torch.Tensor:
        return (x * 255).round() / 255  # the 8-bit image a reader gets: early stopping judges what is stored

    def encode(x: torch.Tensor) -> torch.Tensor:
        x = normalize(x)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            return F.normalize(model.encode_image(x).float(), dim=-1)

    def fill() -> None:
        nonlocal next_row
        for s in (slots.row < 0).nonzero().squeeze(1).tolist():
            if next_row >= n:
                return
            cell, j, i = rows[next_row]
            g = torch.Generator().manual_seed(cell_seed(cfgs[j].seed, cell, i))
            slots.low[s] = (torch.randn(3, config.low_res, config.low_res, generator=g) * 0.5).to(device)
            slots.high[s] = (torch.randn(3, size, size, generator=g) * 0.05).to(device)
            slots.aug[s] = torch.rand(config.steps, 5, generator=g)
            slots.noise[s] = torch.randn(3, size, size, generator=g).to(device)
            for buf in (*slots.m, *slots.v):
                buf[s] = 0
            slots.t[s] = 0
            slots.row[s] = next_row
            next_row += 1

    def emit() -> None:
        """Hand out the cells finished so far (as whole cells, in order of completion)."""
        nonlocal emitted
        if on_cells_done is None or emitted == len(done_cells):
            return
        new = done_cells[emitted:]
        emitted = len(done_cells)
        for cfg in dict.fromkeys(cfgs[j] for j in new):  # one hand-out per setting (a block: keyed by it)
            idx = [offsets[j] + i for j in new if cfgs[j] == cfg for i in range(sizes[j])]
            on_cells_done(_assemble(model, idx, rows, low_out, high_out, steps_used, tgt_all, images, encode,
                                    time.perf_counter() - t0, cfg, return_images))

    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        fill()
        if progress is not None:  # a first line at once, before the first check
            progress({"done": 0, "total": n, "active": int((slots.row >= 0).sum()), "waiting": n - next_row,
                      "step": 0, "steps": config.steps, "mean_cosine": float("nan"), "elapsed": 0.0,
                      "eta": float("nan"), "since_last": 0.0, "precision": config.precision})
        while bool((slots.row >= 0).any()):
            live = (slots.row >= 0).nonzero().squeeze(1)
            t = slots.t[live]
            # per-image cosine schedule over the step budget: an image's steps do not depend on its batch
            lr = config.lr * 0.5 * (1 + torch.cos(math.pi * t.float() / config.steps))
            low = slots.low[live].requires_grad_()
            high = slots.high[live].requires_grad_()
            x = images(low, high)
            # each image's own noise pattern, moved every step: independent of the batch's other images
            shifts = [(int(7 * s % size), int(13 * s % size)) for s in t.tolist()]
            noise = torch.stack([slots.noise[s].roll(shifts=sh, dims=(1, 2)) for s, sh in zip(live.tolist(), shifts,
                                                                                            strict=True)])
            # augmentation strength follows the learning rate down: robust shape first, then the clean image
            entry = [rows[r][1] for r in slots.row[live].tolist()]
            base, decay = aug_base[entry], aug_decay[entry]
            strength = base * ((1 - decay) + decay * lr / config.lr)
            aug = _augment_params(slots.aug[live, t], strength).to(device)
            handles = [m.register_forward_pre_hook(bn_hook) for m in bn_layers]
            try:
                emb = encode(_augment(x, aug, noise))
            finally:
                for h in handles:
                    h.remove()
            tgt = tgt_all[entry]
            loss = -(emb * tgt).sum()
            if bn_layers:
                loss = loss + config.bn_prior * bn_loss().sum()
            g_low, g_high = torch.autograd.grad(loss, [low, high])
            with torch.no_grad():
                slots.t[live] += 1
                tt = slots.t[live].float().to(device)
                step = (lr.to(device))[:, None, None, None]
                for which, (param, grad, scale) in enumerate(((slots.low, g_low, 1.0),
                                                              (slots.high, g_high, config.high_scale))):
                    m, v = slots.m[which], slots.v[which]
                    m[live] = b1 * m[live] + (1 - b1) * grad
                    v[live] = b2 * v[live] + (1 - b2) * grad * grad
                    mhat = m[live] / (1 - b1 ** tt)[:, None, None, None]
                    vhat = v[live] / (1 - b2 ** tt)[:, None, None, None]
                    param[live] -= scale * step * mhat / (vhat.sqrt() + eps)
                own = slots.t[live]
                check = live[(own % config.check_every == 0) | (own >= config.steps)]
                if check.numel():
                    ck_rows = slots.row[check]
                    cos = (encode(quantized(images(slots.low[check], slots.high[check])))
                           * tgt_all[[rows[r][1] for r in ck_rows.tolist()]]).sum(-1).cpu()
                    stop = (cos >= config.target_cosine) | (slots.t[check] >= config.steps)
                    mean_cos = float(cos.mean())
                    for s, r, c_ok in zip(check.tolist(), ck_rows.tolist(), stop.tolist(), strict=True):
                        if not c_ok:
                            continue
                        low_out[r], high_out[r] = slots.low[s], slots.high[s]
                        steps_used[r] = int(slots.t[s])
                        finished[r] = True
                        slots.row[s] = -1
                        j = rows[r][1]
                        cell_left[j] -= 1
                        if cell_left[j] == 0:
                            done_cells.append(j)
                    if progress is not None:
                        now = time.perf_counter()
                        done = int(finished.sum())
                        progress({"done": done, "total": n, "active": int((slots.row >= 0).sum()),
                                  "waiting": n - next_row, "step": int(slots.t[check].max()), "steps": config.steps,
                                  "mean_cosine": mean_cos, "elapsed": now - t0,
                                  "eta": (now - t0) / done * (n - done) if done else float("nan"),
                                  "since_last": now - last_report, "precision": config.precision})
                        last_report = now
            if bool((slots.row < 0).any()) and next_row < n:
                emit()
                fill()
        emit()
    finally:
        for p, r in zip(model.parameters(), requires, strict=True):
            p.requires_grad_(r)
    out = _assemble(model, list(range(n)), rows, low_out, high_out, steps_used, tgt_all, images, encode,
                    time.perf_counter() - t0, config, return_images)
    return out


@torch.no_grad()
def _assemble(model: Any, idx: list[int], rows: list, low: torch.Tensor, high: torch.Tensor, steps_used: torch.Tensor,
              tgt_all: torch.Tensor, images: Callable, encode: Callable, seconds: float, config: SynthesisConfig,
              return_images: bool) -> Prototypes:
    """The prototypes of rows `idx`: each image quantized to 8 bits and encoded again, as a reader of the
    image would see it (what the bank stores is what the images are)."""
    x = images(low[idx], high[idx])
    u8 = (x.clamp(0, 1) * 255 + 0.5).to(torch.uint8)
    emb = torch.cat([encode(u8[i : i + 256].float() / 255) for i in range(0, len(idx), 256)]) if idx else x.new_zeros(0)
    cos = (emb * tgt_all[[rows[r][1] for r in idx]]).sum(-1)
    return Prototypes(emb.cpu(), [rows[r][0] for r in idx], cos.cpu(), steps_used[idx].clone(), seconds, config,
                      u8.permute(0, 2, 3, 1).cpu() if return_images else None)
