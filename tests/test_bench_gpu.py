"""The GPU part of bench/synthesis.py (issue: model FLOP utilisation where a GPU is available), run on the CPU.

No GPU is on the machines these tests run on, so the same code path runs here on the CPU, with a small batch: it must
time the synthesis loop, count its FLOPs and divide them by the same-run matmul rate of each precision, and name the
datasheet peak only for a GPU it knows.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from clipforget.method.projection import text_targets

BENCH = Path(__file__).resolve().parents[1] / "bench" / "synthesis.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_synthesis", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_section_measures_each_precision_against_the_same_run_matmul(bench, toy, toy_grid, text_bank):
    cells = toy_grid.cells[:4]
    g = bench.gpu_speed("cpu", [("toy", toy.model, text_targets(text_bank, cells), cells, 8)], steps=3, matmul_n=256)
    assert [r["precision"] for r in g["speed"]] == ["fp32", "bf16"]
    for r in g["speed"]:
        assert r["images"] == 8 and r["image_steps_per_s"] > 0
        assert r["gflop_per_image_step"] == pytest.approx(g["speed"][0]["gflop_per_image_step"])  # counted, not timed
        assert r["fraction_of_same_precision_matmul"] == pytest.approx(
            r["model_gflops"] / g["matmul_gflops"][r["precision"]])
        assert r["mfu_of_datasheet_peak"] is None  # a CPU has no entry in the datasheet table
    table = "\n".join(bench.gpu_markdown(g))
    assert "| toy | fp32 | 8 |" in table and "| toy | bf16 | 8 |" in table and "not known for this GPU" in table


def test_datasheet_peaks_match_the_most_specific_name(bench):
    assert bench.datasheet_peak("NVIDIA H200") == {"fp32": 67.0, "bf16": 989.4}
    assert bench.datasheet_peak("NVIDIA H200 NVL")["bf16"] == 835.0
    assert bench.datasheet_peak("NVIDIA H100 PCIe")["bf16"] == 756.0
    assert bench.datasheet_peak("NVIDIA A100-SXM4-80GB")["bf16"] == 312.0
    assert bench.datasheet_peak("Tesla T4") is None
