"""Step 6: the gate. Per-cell accuracy before and after, the checks, and the run's artifacts."""

from __future__ import annotations

import re

import torch
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from clipforget.gate.shift import shift_cells
from clipforget.gate.verdict import DATA_FREE_CAVEAT, DATA_FREE_REJECTION, ForgetGroup, Thresholds, Verdict, judge
from clipforget.io.bank import load_prototypes
from clipforget.method.evaluate import LabelledImages, ZeroShotClassifier, image_features
from clipforget.method.grid import Cell, Grid
from clipforget.method.synthesis import SynthesisConfig
from clipforget.steps import compare_features, parse_cells, verified_fold
from tasks.common import loaded_model, run_logger, work_root


def artifact_key(request_id: str, what: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", f"{request_id}-{what}".lower()).strip("-")


def summary_markdown(request_id: str, mode: str, forget: list[str], passed: bool, metrics: dict, checks: list[dict],
                     evaluation: str, data_free: bool = False) -> str:
    verdict = "APPROVED" if passed else "REJECTED — not registered"
    lines = [
        f"# Unlearning request `{request_id}`: {verdict}",
        "",
        f"- mode: `{mode}`; forget cells ({len(forget)}): {', '.join(f'`{c}`' for c in forget)}",
        f"- evaluated on: {evaluation}",
        *([f"- {DATA_FREE_CAVEAT if passed else DATA_FREE_REJECTION}"] if data_free else []),
        f"- forget accuracy {metrics['forget_before']:.3f} → {metrics['forget_after']:.3f} "
        f"(worst forget cell {metrics['forget_max_after']:.3f})",
        f"- retain accuracy {metrics['retain_before']:.3f} → {metrics['retain_after']:.3f} "
        f"(mean drop {metrics['retain_drop']:.3f}; max cell drop {metrics['retain_max_cell_drop']:.3f} "
        f"at `{metrics['worst_retain_cell']}`)",
        *([f"- residual probe (forgotten cell vs its nearest kept cells, linear, held-out accuracy above chance): "
           f"{metrics['probe_excess_before']:.3f} → {metrics['probe_excess_after']:.3f} at most; the released image "
           "embedding only"] if "probe_excess_after" in metrics else []),
        "",
        "| check | decided on | limit | estimate | n | rule | status |",
        "| --- | ---: | ---: | ---: | ---: | --- | :---: |",
    ]
    lines += [f"| {c['name']} | {c['value']:.4f} | {c['limit']:.4f} | "
              f"{c['estimate'] if c.get('estimate') is None else format(c['estimate'], '.4f')} | {c.get('n', '')} | "
              f"{c.get('rule', '')} | {'passed' if c['passed'] else '**' + c.get('status', 'failed') + '**'} |"
              for c in checks]
    return "\n".join(lines) + "\n"


def _heldout_evidence(base_model, sha256: str, heldout_files: list[str], synthesis: dict | None
                      ) -> tuple[torch.Tensor, list[Cell], str]:
    """The base model's embeddings of the held-out prototypes (cached per checkpoint and bank file), their cells,
    and what they are."""
    from clipforget.io.features import bank_image_features

    cells = load_prototypes(heldout_files, SynthesisConfig(**(synthesis or {}))).cells
    features = bank_image_features(base_model, sha256, heldout_files, work_root() / "features")
    return features, cells, f"held-out prototypes ({len(cells)} images; data-free)"


def _pixels(base_model, data_path: str | None, heldout_files: list[str] | None, synthesis: dict | None,
            grid: Grid) -> torch.Tensor:
    """The judged images through the base model's preprocessing (the candidate's is the same: one architecture)."""
    if data_path is not None:
        return LabelledImages.from_folder(data_path, base_model.preprocess, grid).pixels
    protos = load_prototypes(heldout_files or [], SynthesisConfig(**(synthesis or {})))
    assert protos.images is not None, "held-out prototype files must hold images"
    return LabelledImages.from_arrays(protos.images, protos.cells, base_model.preprocess).pixels


def measure(arch: str, base: dict, model: dict, grid: dict, groups: list[dict], *, thresholds: dict,
            data_path: str | None, heldout_files: list[str] | None, synthesis: dict | None,
            data_uri: str | None) -> Verdict:
    """Per-cell accuracy of the base and `model` ({path}) on the same images and the gate's verdict over the
    forget groups ([{mode, cells}]: one for a request, several for a cumulative ledger build).

    The candidate's image embeddings come from the base's through its own last linear map when its file is the base
    with only that map changed (`clipforget.steps.verified_fold`, checked tensor by tensor); any other checkpoint is
    run through its image tower."""
    from clipforget.io.checkpoints import load_model
    from clipforget.io.features import folder_image_features

    g = Grid.from_dict(grid)
    base_model = loaded_model(arch, base["path"], base["sha256"])
    if data_path is not None:  # the base's embeddings of these exact images, cached per checkpoint
        before, cells = folder_image_features(base_model, base["sha256"], data_path, g, work_root() / "features")
        evaluation = f"{data_uri or data_path} ({len(cells)} images)"
    else:
        before, cells, evaluation = _heldout_evidence(base_model, base["sha256"], heldout_files or [], synthesis)
    fold = verified_fold(base_model, model["path"])
    if fold is not None:
        after = fold.apply(before)
    else:
        run_logger("clipforget.validate").info("%s is not the base with only its image tower's last linear map "
                                               "changed: running it on the %d images", model["path"], len(cells))
        after = image_features(load_model(arch, model["path"]).model,
                               _pixels(base_model, data_path, heldout_files, synthesis, g))
    forget_groups = [ForgetGroup(x["mode"], tuple(parse_cells(x["cells"]))) for x in groups]
    forget = list(dict.fromkeys(c for fg in forget_groups for c in fg.cells))
    # held-out prototypes are also judged shifted along their spread; on images the images decide
    shift = shift_cells(forget_groups, cells) if data_path is None else []
    classifier = ZeroShotClassifier(base_model.model, base_model.tokenizer, g)  # the text tower is never folded
    compared = compare_features(classifier, before, after, cells, forget=forget, shift=shift)
    return judge(forget_groups, compared.before, compared.after, Thresholds(**thresholds), evaluation, compared.probe,
                 shifted=compared.shifted)


@task(name="validate")
def validate(request_id: str, arch: str, base: dict, unlearned: dict, grid: dict, groups: list[dict], *,
             thresholds: dict, data_path: str | None = None, heldout_files: list[str] | None = None,
             synthesis: dict | None = None, data_uri: str | None = None) -> dict:
    """Measure base and unlearned model on the same images, apply the gate, publish the artifacts.

    Returns {passed, checks, metrics, cells, before, after, evaluation}; registration follows only if passed.
    """
    logger = get_run_logger()
    verdict = measure(arch, base, unlearned, grid, groups, thresholds=thresholds, data_path=data_path,
                      heldout_files=heldout_files, synthesis=synthesis, data_uri=data_uri)
    out = verdict.to_dict()
    checks, metrics, table, passed = out["checks"], out["metrics"], out["cells"], out["passed"]
    forget = [str(c) for c in verdict.forget]
    create_markdown_artifact(summary_markdown(request_id, verdict.mode, forget, passed, metrics, checks,
                                              verdict.evaluation, data_free=data_path is None),
                             key=artifact_key(request_id, "summary"), description="unlearning verdict and checks")
    create_table_artifact([{**r, "before": round(r["before"], 4), "after": round(r["after"], 4)} for r in table],
                          key=artifact_key(request_id, "cells"), description="per-cell accuracy before/after")
    if out["probe"]:
        create_table_artifact([{"cell": p["cell"], "against": ", ".join(p["against"]), "chance": round(p["chance"], 4),
                                "before": round(p["before"], 4), "after": round(p["after"], 4), "n_test": p["n_test"]}
                               for p in out["probe"]], key=artifact_key(request_id, "probe"),
                              description="residual-knowledge probe per forgotten cell (held-out accuracy)")
    for c in checks:
        (logger.info if c["passed"] else logger.warning)("check %s: %.4f (limit %.4f) %s", c["name"], c["value"],
                                                         c["limit"], "passed" if c["passed"] else "FAILED")
    return out
