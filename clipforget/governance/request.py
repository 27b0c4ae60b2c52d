"""A forget request as it arrives at the pipeline (pydantic models at the edge): the model policy it runs
under, the deletion request a ledger records, and the one-shot request of `clipforget unlearn`. How the
result is judged is the gate's business (`clipforget.gate.verdict`)."""

from __future__ import annotations

import getpass
import hashlib
import json
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from clipforget.gate.verdict import Thresholds
from clipforget.io.storage import normalize_sha256
from clipforget.method.grid import Cell, Grid, Mode, forget_cells
from clipforget.method.synthesis import SynthesisConfig, default_target_cosine

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
MAX_JSON_BYTES = 1 << 20  # a request or policy file; anything larger is not a request
MAX_REQUESTER_CHARS = 256
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def read_json_file(path: str | Path, what: str, limit: int = MAX_JSON_BYTES) -> str:
    """The text of a request/policy JSON file; ValueError (one line) when it is too large or not UTF-8."""
    path = Path(path)
    size = path.stat().st_size  # FileNotFoundError for a missing file
    if size > limit:
        raise ValueError(f"{what} file {path} is {size} bytes; the limit is {limit} bytes (1 MiB)")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} file {path} is not UTF-8 text: {e.reason} at byte {e.start}") from None


def _one_line_name(v: str) -> str:
    """Who asked: one printable line (it becomes an MLflow tag and a line of `request list`)."""
    if _CONTROL.search(v):
        raise ValueError("requested_by must be one line without control characters (newline, tab, ...)")
    if not v.strip() or len(v) > MAX_REQUESTER_CHARS:
        raise ValueError(f"requested_by must be 1-{MAX_REQUESTER_CHARS} characters")
    return v


def _default_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name in some containers
        return "unknown"


class SynthesisSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # upper bounds: a budget beyond them is a typo (10**6 prototypes per cell would run for weeks), not a setting
    prototypes_per_cell: int = Field(default=8, ge=1, le=1024)
    steps: int = Field(default=150, ge=1, le=100_000)
    target_cosine: float | None = Field(default=None, gt=-1, le=1, allow_inf_nan=False,
                                        description="default: 0.77 for the toy model, 0.30 otherwise")
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16"] = Field(default="auto", description="auto: bf16 only where the "
                                                       "hardware does it natively (CUDA, AVX512-BF16/AMX CPUs)")
    # the gate decides a forget cell on the 95% upper bound of its accuracy: with n held-out images none of which
    # is recognized the bound is 1 - 0.05^(1/n), under the 0.15 limit from n = 19 on; a kept cell's drop on paired
    # flips, one flip in 10 for the 0.10 limit, in 20 for 0.05. Unset, each cell gets what the request's checks need
    # (clipforget.gate.verdict.evidence_per_cell; docs/GATE.md)
    heldout_per_cell: int | None = Field(default=None, ge=1, le=1024, description="held-out prototypes per cell for "
                                         "data-free validation; default: as many per cell as the gate's checks need")

    def config(self, arch: str) -> SynthesisConfig:
        target = self.target_cosine if self.target_cosine is not None else default_target_cosine(arch)
        return SynthesisConfig(prototypes_per_cell=self.prototypes_per_cell, steps=self.steps, target_cosine=target,
                               seed=self.seed, precision=self.precision)


class ModelPolicy(BaseModel):
    """A model lineage: the base checkpoint, how each unlearned version is built and judged, and its registry name.

    A deletion-request ledger governs one policy: every version is built from this base checkpoint with
    these settings, so any version can be rebuilt from the policy and the ledger head.
    """

    model_config = ConfigDict(extra="forbid")

    arch: str = "toy"
    checkpoint_uri: str | None = Field(default=None, description="s3://, file:// or a path; default: bundled toy weights")
    checkpoint_sha256: str | None = None
    grid: str | None = Field(default=None, description="toy, pacs, domainnet or a grid JSON file; default toy for the toy "
                             "model, else the grid of the evaluation data")
    data_uri: str | None = Field(default=None, description="labelled <domain>/<class>/ images (S3 prefix or folder); "
                                 "default: data-free validation on held-out prototypes")
    fit_uri: str | None = Field(default=None, description="labelled <domain>/<class>/ images of every cell (S3 prefix "
                                "or folder), other than data_uri, to fit the projection on instead of prototypes, "
                                "with the mode's image settings; default: data-free, prototypes")
    thresholds: Thresholds = Thresholds()
    synthesis: SynthesisSettings = SynthesisSettings()
    projection: Literal["soft", "hard", "margin", "gated"] | None = None
    source: Literal["text", "prototypes", "multimodal"] | None = None
    registered_name: str | None = Field(default=None, description="MLflow registered model name; default clipforget-<arch>")

    @field_validator("checkpoint_sha256")
    @classmethod
    def _hex(cls, v: str | None) -> str | None:
        try:
            return normalize_sha256(v, "checkpoint_sha256")
        except ValueError:
            raise ValueError("checkpoint_sha256 must be a sha256 hex digest") from None

    @field_validator("checkpoint_uri", "data_uri", "fit_uri")
    @classmethod
    def _uri(cls, v: str | None) -> str | None:
        from clipforget.io.storage import Location

        if v is not None:
            loc = Location.parse(v)  # ValueError names a malformed or unsupported URI
            if loc.scheme == "s3" and not loc.key.strip("/"):
                raise ValueError(f"{v}: an S3 URI needs a key or prefix after the bucket, s3://bucket/key")
            if not loc.key:
                raise ValueError(f"{v!r} names no file")
        return v

    @model_validator(mode="after")
    def _name(self) -> ModelPolicy:
        if self.arch != "toy" and self.checkpoint_uri is None:
            raise ValueError(f"arch {self.arch!r} needs checkpoint_uri: the bundled weights are the toy model's")
        if self.fit_uri is not None and self.data_uri is not None and \
                self.fit_uri.rstrip("/") == self.data_uri.rstrip("/"):
            raise ValueError("fit_uri and data_uri are the same images: the gate would judge the projection on the "
                             "images it was fitted on; give data_uri held-out images")
        if self.registered_name is None:
            self.registered_name = f"clipforget-{self.arch}"
        return self

    def _digest(self, *left_out: str) -> str:
        """sha256 of the fields, less `left_out` and the fields added later and not set (`fit_uri`, a later
        threshold): a policy or request that does not use them digests as before they existed, so its registered
        versions and request id stay the same across the upgrade."""
        exclude: dict = {k: True for k in left_out}
        if self.fit_uri is None:
            exclude["fit_uri"] = True
        if self.thresholds.digest_exclude():
            exclude["thresholds"] = self.thresholds.digest_exclude()
        fields = self.model_dump(exclude=exclude)
        if fields.get("synthesis", {}).get("heldout_per_cell", 0) is None:
            # sized evidence (the default since it replaced a fixed 20 per cell) builds the same model and never asks
            # a mode's checks for more than 20 per cell: it digests as that default did, so ids stay the same
            fields["synthesis"]["heldout_per_cell"] = 20
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()

    def policy_digest(self) -> str:
        """A digest of everything in the policy that decides a built model."""
        return self._digest("registered_name")




class DeletionRequest(BaseModel):
    """A data-deletion request as the ledger records it: who asked, why, and what to forget."""

    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(pattern=ID_PATTERN, description="unique id; submitting the same id again is a no-op")
    requested_by: str = Field(default_factory=_default_user)
    reason: str = Field(default="", max_length=4000)
    mode: Mode
    classes: list[str] = Field(default=[], max_length=10_000)
    domains: list[str] = Field(default=[], max_length=10_000)

    _requester = field_validator("requested_by")(_one_line_name)

    def ledger_record(self) -> dict:
        return self.model_dump()

    def cells(self, grid: Grid) -> list[Cell]:
        """The forget cells on a grid; raises ValueError naming what does not fit (unknown names, bad mode use)."""
        return forget_cells(grid, self.mode, self.classes, self.domains)


class UnlearnRequest(ModelPolicy):
    """One forget request against a checkpoint: what to forget, how strictly, and where the approved model goes."""

    request_id: str = Field(default="", description="idempotency key; default: a digest of the request's content")
    requested_by: str = Field(default_factory=_default_user)
    mode: Mode
    classes: list[str] = []
    domains: list[str] = []
    promote: bool = Field(default=False, description="also move the `champion` alias to the approved version")

    _requester = field_validator("requested_by")(_one_line_name)

    @model_validator(mode="after")
    def _ids(self) -> UnlearnRequest:
        if self.projection == "gated" and self.mode == "domain_complete":
            raise ValueError("projection 'gated' cannot forget every class of a domain (mode domain_complete): it "
                             "lowers each class's logit by the same amount on every image of the domain, so the class "
                             "it lowers least keeps its images; use the mode's default projection or 'margin'")
        if not self.request_id:
            self.request_id = f"req-{self.content_digest()[:16]}"
        if not re.match(ID_PATTERN, self.request_id):
            raise ValueError(f"request_id {self.request_id!r} must match {ID_PATTERN}")
        return self

    def content_digest(self) -> str:
        """A digest of everything that decides the result (not who asked, the id itself, nor promotion)."""
        return self._digest("request_id", "requested_by", "promote")

    def policy(self) -> ModelPolicy:
        return ModelPolicy(**self.model_dump(include=set(ModelPolicy.model_fields)))
