"""Bad input, case by case, through the commands people run: `clipforget request submit` and `clipforget unlearn`
(in-process, against the moto S3 server, the `mlflow server` and Prefect's test harness).

Every case asserts: a non-zero exit; exactly one `error:` line, naming the problem; no traceback; nothing
registered (the tracking server's models and versions are unchanged); the ledger unchanged (byte for byte);
and no new file a reader could take for whole (only a content-addressed blob whose bytes hash to its name may
appear: the verified copy of a source). Most cases fail before Prefect starts (exit 2); those only a flow can
see (a checkpoint's bytes, an S3 object) end the flow run Failed with the message (exit 1).
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from reliability_checks import partial_files, registry_state, s3_state, tree_state
from typer.testing import CliRunner

from clipforget.io.checkpoints import TOY_WEIGHTS
from flows.cli import app

UNLEARN = ["unlearn", "--mode", "global", "--classes", "star", "--registered-name", "rel-bad",
           "--prototypes-per-cell", "2", "--steps", "10", "--heldout-per-cell", "2"]
GOOD = {"request_id": "dsr-new", "requested_by": "privacy@example.com", "mode": "global", "classes": ["heart"]}
TINY_VIT = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}


@dataclass
class Case:
    id: str
    message: str  # a substring the one error line must hold
    request: dict | bytes | None = None  # `request submit` of this request (JSON, or raw bytes)
    policy: dict | None = None  # ... under this policy
    unlearn: list[str] | None = None  # else `unlearn` with these extra arguments ({ws} is the workspace)
    make: Callable[[Path, dict], None] | None = None  # writes the files the case needs into the workspace
    flow: bool = False  # only a flow run can see this: exit 1 and a failed run, not exit 2 up front
    what: str = ""
    extra: list[str] = field(default_factory=list)


def req(**kw) -> dict:
    return {**GOOD, **kw}


def policy(**kw) -> dict:
    return {"registered_name": "rel-bad", **kw}


# --- helpers that write bad files -------------------------------------------------------------------------

def toy_state() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(TOY_WEIGHTS))


def write_state(path: Path, state: dict) -> None:
    from safetensors.torch import save_file

    save_file(state, str(path))


def png(w: int, h: int, color=(200, 30, 30)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="PNG")
    return buf.getvalue()


def huge_png_header(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h pixels (the pixels themselves are never there): a decompression bomb's
    first bytes, without allocating the image."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + \
        chunk(b"IEND", b"")


def data_case(mutate: Callable[[Path, dict], None]) -> Callable[[Path, dict], None]:
    """A copy of the small valid render, then one thing made wrong."""
    import shutil

    def make(ws: Path, ctx: dict) -> None:
        shutil.copytree(ctx["render"], ws / "data")
        mutate(ws / "data", ctx)

    return make


def s3_data_case(prefix: str, keys: list[str]) -> Callable[[Path, dict], None]:
    """Valid 64x64 PNGs under s3://bucket/prefix/ at `keys` (<domain>/<class>/<file>)."""

    def make(ws: Path, ctx: dict) -> None:
        for key in keys:
            ctx["client"].put_object(Bucket=ctx["bucket"], Key=f"{prefix}/{key}", Body=png(64, 64))

    return make


def one_image(root: Path) -> Path:
    return sorted(root.glob("*/*/*.png"))[0]


def corrupt(root: Path, ctx: dict) -> None:
    p = one_image(root)
    data = bytearray(p.read_bytes())
    data[60:70] = b"\xff" * 10  # inside the image data: the chunk's CRC no longer matches
    p.write_bytes(bytes(data))


def truncate_png(root: Path, ctx: dict) -> None:
    p = one_image(root)
    p.write_bytes(p.read_bytes()[:40])


def symlink_out(root: Path, ctx: dict) -> None:
    secret = root.parent / "outside.png"
    secret.write_bytes(png(64, 64))
    (root / "photo" / "star" / "link.png").symlink_to(secret)


def symlink_dir_out(root: Path, ctx: dict) -> None:
    elsewhere = root.parent / "elsewhere"
    (elsewhere / "star").mkdir(parents=True)
    (elsewhere / "star" / "0.png").write_bytes(png(64, 64))
    (root / "linked").symlink_to(elsewhere, target_is_directory=True)


def pickle_payload(ws: Path, ctx: dict) -> None:
    class Payload:
        def __reduce__(self):
            return (Path.touch, (ws / "pwned",))

    torch.save({"state_dict": {"visual.proj": Payload()}}, ws / "evil.pt")


def truncated_ckpt(ws: Path, ctx: dict) -> None:
    data = TOY_WEIGHTS.read_bytes()
    (ws / "half.safetensors").write_bytes(data[: len(data) // 2])


def lying_header(ws: Path, ctx: dict) -> None:
    (ws / "lying.safetensors").write_bytes(struct.pack("<Q", 10**9) + b'{"a": 1}')


def nonfinite(value: float) -> Callable[[Path, dict], None]:
    def make(ws: Path, ctx: dict) -> None:
        state = toy_state()
        state["visual.attnpool.c_proj.weight"][0, 0] = value
        write_state(ws / "bad.safetensors", state)

    return make


def vit_without_proj(ws: Path, ctx: dict) -> None:
    import open_clip

    state = open_clip.create_model("relvit").state_dict()
    del state["visual.proj"]
    write_state(ws / "noproj.safetensors", {k: v.contiguous() for k, v in state.items()})


def grid_file(data: dict) -> Callable[[Path, dict], None]:
    def make(ws: Path, ctx: dict) -> None:
        (ws / "grid.json").write_text(json.dumps(data))

    return make


def text_file(name: str, content: str | bytes) -> Callable[[Path, dict], None]:
    def make(ws: Path, ctx: dict) -> None:
        (ws / name).write_bytes(content if isinstance(content, bytes) else content.encode())

    return make


TOY_CLASSES = ["star", "heart", "circle", "square", "triangle", "arrow", "cross", "house", "tree", "moon"]
DOMAINS = ["photo", "painting", "cartoon", "sketch"]

CASES = [
    # --- requests ---------------------------------------------------------------------------------------
    Case("request: unknown class", "unknown class 'unicorn'", req(classes=["unicorn"])),
    Case("request: unknown domain", "unknown domain 'oil'", req(mode="domain", classes=["star"], domains=["oil"])),
    Case("request: empty forget set", "give classes and no domains", req(classes=[])),
    Case("request: every cell forgotten", "every cell", req(mode="domain_complete", classes=[], domains=DOMAINS)),
    Case("request: a whole domain under a gated policy", "cannot forget every class of a domain (sketch)",
         req(mode="domain_complete", classes=[], domains=["sketch"]), policy=policy(projection="gated")),
    Case("unlearn: a whole domain with the gated projection", "cannot forget every class of a domain",
         unlearn=["--mode", "domain_complete", "--domains", "sketch", "--projection", "gated"]),
    Case("request: global with domains", "give classes and no domains", req(domains=["sketch"])),
    Case("request: domain mode without domains", "give both classes and domains", req(mode="domain")),
    Case("request: domain_complete with classes", "give domains and no classes",
         req(mode="domain_complete", domains=["sketch"])),
    Case("request: unknown mode", "mode: Input should be 'global', 'domain' or 'domain_complete'", req(mode="forget-all")),
    Case("request: unknown field", "priority: Extra inputs are not permitted", req(priority="high")),
    Case("request: missing request_id", "request_id: Field required", {k: v for k, v in GOOD.items() if k != "request_id"}),
    Case("request: not JSON", "Invalid JSON", b"mode: global\nclasses: [star]\n"),
    Case("request: JSON but not an object", "Input should be an object", b'["global", "star"]'),
    Case("request: not UTF-8", "is not UTF-8 text", b'{"request_id": "dsr-\xff"}'),
    Case("request: file over 1 MiB", "the limit is 1048576 bytes (1 MiB)",
         json.dumps(req(reason="x" * (1 << 20))).encode()),
    Case("request: id with a slash", "request_id: String should match pattern", req(request_id="dsr/1")),
    Case("request: id with a backslash", "request_id: String should match pattern", req(request_id="dsr\\1")),
    Case("request: id '..'", "request_id: String should match pattern", req(request_id="..")),
    Case("request: id ../escape", "request_id: String should match pattern", req(request_id="../escape")),
    Case("request: id with a newline", "request_id: String should match pattern", req(request_id="dsr\n1")),
    Case("request: id with a NUL", "request_id: String should match pattern", req(request_id="dsr\x001")),
    Case("request: id of 10,000 characters", "request_id: String should match pattern", req(request_id="d" * 10_000)),
    Case("request: empty id", "request_id: String should match pattern", req(request_id="")),
    Case("request: same id, other content", "request id 'dsr-0' is already in the ledger with other content",
         req(request_id="dsr-0"), flow=True),
    Case("request: requested_by with newlines", "requested_by must be one line",
         req(requested_by="alice\n| forged | row |\n<script>x</script>")),
    Case("request: requested_by of 10,000 characters", "requested_by must be 1-256 characters",
         req(requested_by="a" * 10_000)),
    Case("request: reason of 5,000 characters", "reason: String should have at most 4000 characters",
         req(reason="r" * 5000)),
    Case("request: classes as a string", "classes: Input should be a valid array", req(classes="star")),
    # --- policies and thresholds ------------------------------------------------------------------------
    Case("policy: max_forget_acc above 1", "thresholds.max_forget_acc: Input should be less than or equal to 1",
         req(), policy(thresholds={"max_forget_acc": 1.5})),
    Case("policy: negative max_retain_drop", "thresholds.max_retain_drop: Input should be greater than or equal to 0",
         req(), policy(thresholds={"max_retain_drop": -0.1})),
    Case("policy: NaN threshold", "thresholds.max_forget_acc: Input should be a finite number",
         req(), policy(thresholds={"max_forget_acc": float("nan")})),
    Case("policy: no check at all", "a gate needs a check", req(), policy(thresholds={"mode_criteria": False})),
    Case("policy: 0 prototypes per cell", "synthesis.prototypes_per_cell: Input should be greater than or equal to 1",
         req(), policy(synthesis={"prototypes_per_cell": 0})),
    Case("policy: 10^6 prototypes per cell", "synthesis.prototypes_per_cell: Input should be less than or equal to 1024",
         req(), policy(synthesis={"prototypes_per_cell": 10**6})),
    Case("policy: 0 steps", "synthesis.steps: Input should be greater than or equal to 1", req(),
         policy(synthesis={"steps": 0})),
    Case("policy: 10^9 steps", "synthesis.steps: Input should be less than or equal to 100000", req(),
         policy(synthesis={"steps": 10**9})),
    Case("policy: 0 held-out prototypes", "synthesis.heldout_per_cell: Input should be greater than or equal to 1",
         req(), policy(synthesis={"heldout_per_cell": 0})),
    Case("policy: target cosine 2", "synthesis.target_cosine: Input should be less than or equal to 1", req(),
         policy(synthesis={"target_cosine": 2.0})),
    Case("policy: unknown architecture", "unknown open_clip architecture 'ViT-Z-99'", req(),
         policy(arch="ViT-Z-99", grid="toy", checkpoint_uri=str(TOY_WEIGHTS)), flow=True),
    Case("policy: other architecture without a checkpoint", "arch 'ViT-B-32' needs checkpoint_uri", req(),
         policy(arch="ViT-B-32")),
    Case("policy: unknown projection", "projection: Input should be 'soft', 'hard'", req(),
         policy(projection="diagonal")),
    Case("policy: unknown field", "retries: Extra inputs are not permitted", req(), policy(retries=3)),
    Case("policy: grid file repeating a name", "repeats the class name(s) 'star'", req(), policy(grid="{ws}/grid.json"),
         make=grid_file({"classes": ["star", "heart", "star"], "domains": DOMAINS})),
    Case("policy: grid file with an empty name", "has a bad domain name ''", req(), policy(grid="{ws}/grid.json"),
         make=grid_file({"classes": ["star", "heart"], "domains": ["photo", ""]})),
    Case("policy: grid file with a name holding '/'", "has a bad class name 'a/b'", req(), policy(grid="{ws}/grid.json"),
         make=grid_file({"classes": ["star", "a/b"], "domains": DOMAINS})),
    Case("policy: grid file with a string for a list", "'classes' and 'domains' must be lists", req(),
         policy(grid="{ws}/grid.json"), make=grid_file({"classes": "star", "domains": DOMAINS})),
    Case("policy: grid file not JSON", "cannot read grid file", req(), policy(grid="{ws}/grid.json"),
         make=text_file("grid.json", "classes: [star]")),
    Case("policy: unknown grid", "unknown grid 'nowhere'", req(), policy(grid="nowhere")),
    # --- checkpoints ------------------------------------------------------------------------------------
    Case("checkpoint: truncated safetensors", "is truncated: tensor", unlearn=["--checkpoint", "{ws}/half.safetensors"],
         make=truncated_ckpt, flow=True),
    Case("checkpoint: header claims more bytes than the file", "its header claims 1000000000 bytes but only 8 follow",
         unlearn=["--checkpoint", "{ws}/lying.safetensors"], make=lying_header, flow=True),
    Case("checkpoint: NaN weights", "1 tensor(s) hold NaN or Inf values (visual.attnpool.c_proj.weight)",
         unlearn=["--checkpoint", "{ws}/bad.safetensors"], make=nonfinite(float("nan")), flow=True),
    Case("checkpoint: Inf weights", "1 tensor(s) hold NaN or Inf values (visual.attnpool.c_proj.weight)",
         unlearn=["--checkpoint", "{ws}/bad.safetensors"], make=nonfinite(float("inf")), flow=True),
    Case("checkpoint: state dict of another architecture", "the state dict does not fit relvit: ",
         unlearn=["--model", "relvit", "--grid", "toy", "--checkpoint", str(TOY_WEIGHTS)], flow=True),
    Case("checkpoint: ViT without visual.proj", "the state dict does not fit relvit: 1 missing tensor(s) (visual.proj)",
         unlearn=["--model", "relvit", "--grid", "toy", "--checkpoint", "{ws}/noproj.safetensors"],
         make=vit_without_proj, flow=True),
    Case("checkpoint: .pt whose pickle would run code", "holds pickled Python objects, not a plain state dict",
         unlearn=["--checkpoint", "{ws}/evil.pt"], make=pickle_payload, flow=True),
    Case("checkpoint: wrong sha256", "sha256 mismatch: expected " + "0" * 64,
         unlearn=["--checkpoint", str(TOY_WEIGHTS), "--checkpoint-sha256", "0" * 64], flow=True),
    Case("checkpoint: malformed sha256", "checkpoint_sha256: checkpoint_sha256 must be a sha256 hex digest",
         unlearn=["--checkpoint", str(TOY_WEIGHTS), "--checkpoint-sha256", "abc"]),
    Case("checkpoint: S3 key that does not exist", "models/nothing.safetensors: no such object",
         unlearn=["--checkpoint", "s3://{bucket}/models/nothing.safetensors"], flow=True),
    Case("checkpoint: S3 bucket that does not exist", "bucket 'no-such-bucket' does not exist",
         unlearn=["--checkpoint", "s3://no-such-bucket/toy.safetensors"], flow=True),
    Case("checkpoint: s3:// URI without a bucket", "an S3 URI needs a bucket", unlearn=["--checkpoint", "s3:///toy.safetensors"]),
    Case("checkpoint: s3:// URI without a key", "needs a key or prefix after the bucket", unlearn=["--checkpoint", "s3://bucket"]),
    Case("checkpoint: unsupported scheme", "unsupported scheme 'ftp'", unlearn=["--checkpoint", "ftp://host/toy.safetensors"]),
    Case("checkpoint: local file that does not exist", "no such file",
         unlearn=["--checkpoint", "{ws}/missing.safetensors"], flow=True),
    # --- data folders -----------------------------------------------------------------------------------
    Case("data: no images", "no images found under", unlearn=["--data", "{ws}/data"],
         make=lambda ws, ctx: [(ws / "data" / "photo" / "star").mkdir(parents=True),
                               (ws / "data" / "photo" / "star" / "notes.txt").write_text("hi")]),
    Case("data: a text file named .png", "is not a readable image: UnidentifiedImageError", unlearn=["--data", "{ws}/data"],
         make=data_case(lambda root, ctx: one_image(root).write_text("not an image"))),
    Case("data: corrupt PNG", "is not a readable image", unlearn=["--data", "{ws}/data"], make=data_case(corrupt)),
    Case("data: truncated PNG", "is not a readable image", unlearn=["--data", "{ws}/data"], make=data_case(truncate_png)),
    Case("data: 1x1 image", "is 1x1 pixels; images need at least 8x8", unlearn=["--data", "{ws}/data"],
         make=data_case(lambda root, ctx: one_image(root).write_bytes(png(1, 1)))),
    Case("data: 10,000x10,000 image", "is 10000x10000 pixels; the limit is 40000000 pixels",
         unlearn=["--data", "{ws}/data"],
         make=data_case(lambda root, ctx: one_image(root).write_bytes(huge_png_header(10_000, 10_000)))),
    Case("data: symlink to a file outside the folder", "points outside the evaluation data folder",
         unlearn=["--data", "{ws}/data"], make=data_case(symlink_out)),
    Case("data: symlinked folder outside the folder", "points outside the evaluation data folder",
         unlearn=["--data", "{ws}/data"], make=data_case(symlink_dir_out)),
    Case("data: class folder not in the grid", "holds cells outside grid 'toy': dragon/photo",
         unlearn=["--data", "{ws}/data"], make=data_case(lambda root, ctx: [
             (root / "photo" / "dragon").mkdir(), (root / "photo" / "dragon" / "0.png").write_bytes(png(64, 64))])),
    Case("data: domain folder not in the grid", "holds cells outside grid 'toy': star/oil",
         unlearn=["--data", "{ws}/data"], make=data_case(lambda root, ctx: [
             (root / "oil" / "star").mkdir(parents=True), (root / "oil" / "star" / "0.png").write_bytes(png(64, 64))])),
    Case("data: S3 prefix holding a corrupt PNG", "is not a readable image", unlearn=["--data", "s3://{bucket}/bad-eval/"],
         make=lambda ws, ctx: ctx["client"].put_object(Bucket=ctx["bucket"], Key="bad-eval/photo/star/0.png",
                                                         Body=b"\x89PNG\r\n\x1a\n" + b"garbage" * 10), flow=True),
    Case("data: S3 prefix with nothing under it", "no objects under this prefix", unlearn=["--data", "s3://{bucket}/empty/"],
         flow=True),
    # folders outside the grid on S3 fail in the fetch step, before synthesis (no bank file appears), naming the prefix
    Case("data: S3 prefix with a class folder not in the grid", "s3://{bucket}/grid-class holds cells outside grid "
         "'toy': dragon/photo", unlearn=["--data", "s3://{bucket}/grid-class/"], make=s3_data_case("grid-class", [
             "photo/star/0.png", "photo/dragon/0.png"]), flow=True),
    Case("data: S3 prefix with a domain folder not in the grid", "s3://{bucket}/grid-domain holds cells outside grid "
         "'toy': star/oil", unlearn=["--data", "s3://{bucket}/grid-domain/"], make=s3_data_case("grid-domain", [
             "photo/star/0.png", "oil/star/0.png"]), flow=True),
    Case("data: local folder that does not exist", "evaluation data folder not found", unlearn=["--data", "{ws}/nowhere"]),
]


@pytest.fixture(scope="module")
def ctx(servers, tmp_path_factory):
    """The servers, a small valid render (1 image per cell) and a tiny ViT config (`relvit`) registered with open_clip."""
    import open_clip

    render = tmp_path_factory.mktemp("render") / "toy"
    r = CliRunner().invoke(app, ["toy", "render", "--out", str(render), "--per-cell", "1", "--seed", 7])
    assert r.exit_code == 0, r.output
    cfg = tmp_path_factory.mktemp("configs") / "relvit.json"
    cfg.write_text(json.dumps(TINY_VIT))
    if "relvit" not in open_clip.list_models():
        open_clip.add_model_config(cfg)
    return {"render": render, "client": servers["client"], "bucket": servers["bucket"]}


def _fmt(text: str, ws: Path, ctx: dict) -> str:
    return text.replace("{ws}", str(ws)).replace("{bucket}", ctx["bucket"])


def _fmt_json(obj, ws: Path, ctx: dict):
    if isinstance(obj, str):
        return _fmt(obj, ws, ctx)
    if isinstance(obj, dict):
        return {k: _fmt_json(v, ws, ctx) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_fmt_json(v, ws, ctx) for v in obj]
    return obj


def test_bad_input_table_has_at_least_40_cases():
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, ctx, tmp_path, monkeypatch, checked):
    from clipforget.governance.ledger import Ledger

    ws = tmp_path
    monkeypatch.chdir(ws)
    monkeypatch.setenv("CLIPFORGET_CACHE", str(ws / "cache"))
    ledger = ws / "ledger"
    Ledger(ledger).append("dsr-0", {**GOOD, "request_id": "dsr-0", "classes": ["star"]})
    if case.make:
        case.make(ws, ctx)
    if case.unlearn is not None:
        args = [*UNLEARN, *[_fmt(a, ws, ctx) for a in case.unlearn], "--json", str(ws / "out.json")]
    else:
        path = ws / "request.json"
        path.write_bytes(case.request if isinstance(case.request, bytes) else json.dumps(case.request).encode())
        args = ["request", "submit", str(path), "--ledger", str(ledger), "--json", str(ws / "out.json")]
        if case.policy is not None:
            (ws / "policy.json").write_text(json.dumps(_fmt_json(case.policy, ws, ctx)))
            args += ["--policy", str(ws / "policy.json")]
    registered = registry_state()
    files = tree_state(ws)
    s3_before = s3_state(ctx["client"], ctx["bucket"], "ledger/")

    result = CliRunner().invoke(app, args)

    out = result.output
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert result.exit_code == (1 if case.flow else 2), out
    assert len(errors) == 1 and _fmt(case.message, ws, ctx) in errors[0], out
    assert isinstance(result.exception, SystemExit), out  # a clean exit, never an uncaught exception
    if case.flow:  # the run's own log (Prefect's, with its tracebacks) precedes the command's error line
        assert "the flow ended FAILED" in errors[0], errors[0]
    else:
        assert "Traceback" not in out, out
    assert registry_state() == registered
    after = tree_state(ws)
    assert {k: v for k, v in after.items() if k.startswith(str(ledger))} == \
        {k: v for k, v in files.items() if k.startswith(str(ledger))}
    assert s3_state(ctx["client"], ctx["bucket"], "ledger/") == s3_before
    assert partial_files(files, after) == []
    assert not (ws / "pwned").exists()  # no unpickled object ran code
    checked(f"exit {result.exit_code}; one error line: {errors[0][len('error: '):][:160]}; nothing registered; "
            "ledger unchanged; no partial file", bad_registrations=0, ledger_delta=0)


CORRUPT_IMAGES = {"corrupt PNG": corrupt, "truncated PNG": truncate_png,
                  "text file named .png": lambda root, ctx: one_image(root).write_text("not an image")}


@pytest.mark.parametrize("command", ["eval", "forget"])
@pytest.mark.parametrize("kind", list(CORRUPT_IMAGES))
def test_eval_and_forget_name_a_corrupt_image_on_one_line(command, kind, ctx, tmp_path, monkeypatch, checked):
    """`clipforget eval` and `clipforget forget` (the commands without orchestration) on a data folder holding one
    bad image: exit 2 with one error line naming the file, no traceback, nothing written."""
    ws = tmp_path
    monkeypatch.chdir(ws)
    monkeypatch.setenv("CLIPFORGET_CACHE", str(ws / "cache"))
    data_case(CORRUPT_IMAGES[kind])(ws, ctx)
    bad = one_image(ws / "data")
    args = {"eval": ["eval", "--data", str(ws / "data"), "--json", str(ws / "out.json")],
            "forget": ["forget", "--mode", "global", "--classes", "star", "--data", str(ws / "data"),
                       "--prototypes-per-cell", "2", "--steps", "10", "--out", str(ws / "out.safetensors"),
                       "--json", str(ws / "out.json")]}[command]
    files = tree_state(ws)

    result = CliRunner().invoke(app, args)

    out = result.output
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), out
    assert len(errors) == 1 and f"image {bad} is not a readable image" in errors[0], out
    assert "Traceback" not in out, out
    assert partial_files(files, tree_state(ws)) == []
    checked(f"`clipforget {command}` on a {kind}: exit 2; one error line: {errors[0][len('error: '):][:160]}; "
            "no traceback; nothing written", bad_registrations=0)
