"""benchmarks/mixed.py end to end in ``--quick`` mode (tiny models, 256 images, one seed): the CI smoke test."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    base = tmp_path_factory.mktemp("mixed")
    completed = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "mixed.py"), "--quick", "--jobs", "1",
                                "--cache", str(base / "cache"), "--results", str(base / "results")],
                               capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return {"out": base / "results", "result": json.loads((base / "results" / "mixed_quick.json").read_text()),
            "stdout": completed.stdout}


def test_every_allocation_trains_within_its_budget(quick):
    result = quick["result"]
    labels = {"uniform_W2", "uniform_W3"} | {f"{kind}@{t}" for kind in ("sharpness", "hessian", "random")
                                             for t in ("2.5", "3")}
    assert {(r["model"], r["label"]) for r in result["rows"]} == {(m, label) for m in ("vit", "convnext")
                                                                  for label in labels}
    for row in result["rows"]:
        target = 3.0 if row["label"].endswith("@3") else 2.5 if "@" in row["label"] else None
        if target is not None:
            assert row["average_bits"] <= target + 1e-9
        assert 0.0 <= row["accuracy"] <= 100.0 and row["train_seconds"] > 0
    for search in result["searches"]:  # an average of 3 bits packs to no more than uniform W3A3
        for measure in ("sharpness", "hessian", "random"):
            assert search["plans"][f"{measure}@3"]["weight_bytes"] <= search["uniform_bytes"]["3"]
            assert search["plans"][f"{measure}@2.5"]["weight_bytes"] < search["uniform_bytes"]["3"]


def test_deltas_are_seed_paired_differences_of_the_rows(quick):
    result = quick["result"]
    rows = {(r["model"], r["label"]): r["accuracy"] for r in result["rows"]}
    checked = 0
    for delta in result["deltas"]:
        label, base = delta["comparison"].split(" - ")
        assert delta["delta"] == pytest.approx(rows[(delta["model"], label)] - rows[(delta["model"], base)])
        checked += 1
    assert checked == 2 * 12


def test_search_cost_and_the_figure_are_reported(quick):
    result = quick["result"]
    assert {(c["model"], c["measure"]) for c in result["search_cost"]} == {
        (m, k) for m in ("vit", "convnext") for k in ("sharpness", "hessian")}
    for cost in result["search_cost"]:
        # Timed alone: the median search over the QAT run timed in the same process.
        assert cost["search_seconds_median"] > 0 and cost["qat_seconds"] > 0
        assert cost["share_of_qat"] == pytest.approx(cost["search_seconds_median"] / cost["qat_seconds"])
    assert 0 < result["vit_b16_estimate"]["share_of_qat"] < 10
    assert (quick["out"] / "mixed_quick.png").read_bytes()[:8] == PNG_MAGIC
    assert "Search cost" in quick["stdout"]


def test_a_bad_qat_epochs_is_one_line_before_any_run(tmp_path):
    completed = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "mixed.py"), "--quick", "--qat_epochs", "0",
                                "--cache", str(tmp_path / "cache"), "--results", str(tmp_path / "results")],
                               capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert completed.returncode != 0
    assert completed.stderr.strip().splitlines()[-1] == "mixed.py: --qat_epochs must be >= 1, got 0"
    assert not (tmp_path / "cache").exists() and not (tmp_path / "results").exists()
