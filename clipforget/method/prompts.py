"""Domain-aware prompt templates and the text embeddings built from them.

A template set maps a domain name to several phrasings ("a sketch of a {}", "a pencil drawing of a {}");
class-only templates carry no domain and are shared by every domain.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

DOMAIN_TEMPLATES: dict[str, tuple[str, ...]] = {
    # toy world, PACS and DomainNet styles share names where they mean the same look
    "photo": ("a photo of a {}.", "a photograph of a {}.", "a shaded {} on a textured background."),
    "real": ("a photo of a {}.", "a real photograph of a {}.", "a close-up photo of a {}."),
    "painting": ("a painting of a {}.", "an oil painting of a {}.", "a {} painted with brush strokes."),
    "art_painting": ("an art painting of a {}.", "an oil painting of a {}.", "a painting of a {}."),
    "cartoon": ("a cartoon {}.", "a cartoon drawing of a {}.", "a flat {} with a thick outline."),
    "sketch": ("a sketch of a {}.", "a pencil sketch of a {}.", "a line drawing of a {}."),
    "clipart": ("a clipart of a {}.", "a clip art image of a {}.", "a clipart illustration of a {}."),
    "infograph": ("an infographic of a {}.", "an infographic with a {}.", "an infographic icon of a {}."),
    "quickdraw": ("a quickdraw of a {}.", "a quick doodle of a {}.", "a hand-drawn doodle of a {}."),
}
CLASS_TEMPLATES: tuple[str, ...] = ("a {}.", "a picture of a {}.")
GENERIC_DOMAIN_TEMPLATES: tuple[str, ...] = (
    "a {domain} of a {{}}.", "a {domain} image of a {{}}.", "a {{}} in {domain} style.",
)


class TemplateSet:
    """Prompt templates per domain, with a generic fallback for domains nobody wrote phrasings for."""

    def __init__(
        self,
        domain_templates: Mapping[str, Sequence[str]] | None = None,
        class_templates: Sequence[str] = CLASS_TEMPLATES,
    ) -> None:
        self.domain_templates = {k: tuple(v) for k, v in (domain_templates or DOMAIN_TEMPLATES).items()}
        self.class_templates = tuple(class_templates)
        for name, ts in [*self.domain_templates.items(), ("class-only", self.class_templates)]:
            for t in ts:
                if t.count("{}") != 1:
                    raise ValueError(f"template {t!r} for {name} must contain exactly one '{{}}' for the class name")

    @classmethod
    def from_file(cls, path: str | Path) -> TemplateSet:
        """JSON: {"domains": {"sketch": ["a sketch of a {}.", ...]}, "class_only": ["a {}."]}."""
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict) or not isinstance(data.get("domains"), dict):
            raise ValueError(f"{path}: expected a JSON object with a 'domains' mapping of domain -> templates")
        return cls(data["domains"], data.get("class_only", CLASS_TEMPLATES))

    def for_domain(self, domain: str) -> tuple[str, ...]:
        if domain in self.domain_templates:
            return self.domain_templates[domain]
        pretty = domain.replace("_", " ")
        return tuple(t.format(domain=pretty) for t in GENERIC_DOMAIN_TEMPLATES)

    def cell_prompts(self, cls: str, domain: str) -> list[str]:
        return [t.format(cls.replace("_", " ")) for t in self.for_domain(domain)]

    def class_prompts(self, cls: str, domains: Sequence[str]) -> list[str]:
        """Domain-ensembled prompts for zero-shot class prediction."""
        name = cls.replace("_", " ")
        prompts = [t.format(name) for d in domains for t in self.for_domain(d)]
        return prompts + [t.format(name) for t in self.class_templates]


@torch.no_grad()
def encode_prompts(
    model: Any, tokenizer: Any, prompts: Sequence[str], device: str | torch.device = "cpu"
) -> torch.Tensor:
    """Normalized text embeddings [n, d] in float32."""
    tokens = tokenizer(list(prompts)).to(device)
    return torch.nn.functional.normalize(model.encode_text(tokens).float(), dim=-1)


@torch.no_grad()
def class_text_embeddings(model, tokenizer, templates: TemplateSet, classes: Sequence[str], domains: Sequence[str],
                          device: str | torch.device = "cpu") -> torch.Tensor:
    """One normalized zero-shot classifier row per class: the mean of its domain-ensembled prompts."""
    rows = [encode_prompts(model, tokenizer, templates.class_prompts(c, domains), device).mean(0) for c in classes]
    return torch.nn.functional.normalize(torch.stack(rows), dim=-1)
