"""The benchmark scripts end to end in ``--quick`` mode: tiny models, 256 images, every mode (CI smoke test)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = {"model": str, "dataset": str, "w_bits": int, "a_bits": int, "mode": str, "rho": float, "seed": int,
            "accuracy": float, "train_seconds": float}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run(script, *args):
    completed = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *map(str, args)],
                               capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return completed.stdout


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    base = tmp_path_factory.mktemp("quick")
    cache, out = base / "cache", base / "results"
    stdout = run("accuracy.py", "--quick", "--jobs", "1", "--cache", cache, "--out", out)
    sharp_stdout = run("sharpness.py", "--quick", "--jobs", "1", "--results", out)
    return {"cache": cache, "out": out, "stdout": stdout, "sharp_stdout": sharp_stdout,
            "accuracy": json.loads((out / "accuracy.json").read_text()),
            "sharpness": json.loads((out / "sharpness.json").read_text()),
            "landscape": json.loads((out / "landscape.json").read_text())}


def test_accuracy_rows_cover_every_mode_and_the_cross_check_with_the_required_fields(quick):
    rows = quick["accuracy"]["rows"]
    modes = ["qat", "case1", "case2", "saq", "saq_every_k", "saq_reuse_grad"]
    expected = {(m, d, mode) for m in ("vit", "convnext") for d, ms in (("mnist", modes), ("digits", ["qat", "saq"]))
                for mode in ms}
    assert {(r["model"], r["dataset"], r["mode"]) for r in rows} == expected
    assert len(rows) == len(expected)  # one bit-width, one seed in quick mode
    for row in rows:
        for key, kind in REQUIRED.items():
            assert isinstance(row[key], kind), (key, row[key])
        assert 0.0 <= row["accuracy"] <= 100.0 and row["train_seconds"] > 0
        assert (row["rho"] == 0.0) == (row["mode"] == "qat")
        assert row["rho"] in (0.0, quick["accuracy"]["rho"][row["model"]])


def test_rho_is_picked_from_the_grid_by_validation_accuracy_of_saq(quick):
    result = quick["accuracy"]
    for arch, rho in result["rho"].items():
        grid = result["plan"]["rho_grid"][arch]
        sweep = {r["rho"]: r["val_accuracy"] for r in result["rho_sweep"] if r["model"] == arch and r["mode"] == "saq"}
        assert set(sweep) == set(grid)
        assert sweep[rho] == max(sweep.values())


def test_fp_stage_records_its_per_epoch_curve_and_the_summary_pairs_seeds_with_qat(quick):
    result = quick["accuracy"]
    assert {(f["model"], f["dataset"]) for f in result["fp"]} == {(m, d) for m in ("vit", "convnext")
                                                                for d in ("mnist", "digits")}
    for fp in result["fp"]:
        assert [c["epoch"] for c in fp["curve"]] == list(range(1, result["plan"]["fp"]["epochs"] + 1))
        assert fp["test_accuracy"] == fp["curve"][-1]["test_accuracy"]
    rows = {(r["model"], r["dataset"], r["mode"]): r["accuracy"] for r in result["rows"]}
    for s in result["summary"]:
        expected = rows[(s["model"], s["dataset"], s["mode"])] - rows[(s["model"], s["dataset"], "qat")]
        assert s["delta_vs_qat_mean"] == pytest.approx(expected)
    assert any(g["check"] == "saq - qat (pt)" for g in result["goals"])


def test_every_script_writes_a_png(quick):
    for name in ("accuracy.png", "sharpness.png", "landscape.png"):
        assert (quick["out"] / name).read_bytes()[:8] == PNG_MAGIC


def test_sharpness_measures_saved_final_models_and_compares_to_qat(quick):
    rows = quick["sharpness"]["rows"]
    assert {(r["model"], r["mode"]) for r in rows} == {(m, mode) for m in ("vit", "convnext")
                                                       for mode in ("qat", "case2", "saq", "saq_reuse_grad")}
    for row in rows:
        assert math.isfinite(row["top_eigenvalue"]) and row["adversarial_loss_increase"] > row["random_loss_increase"]
        probe = quick["accuracy"]["rho"][row["model"]]
        assert row["rho"] == probe  # every model is probed at its architecture's SAQ radius
        assert row["trained_rho"] == (0.0 if row["mode"] == "qat" else probe)
    ratio_modes = {(r["model"], r["mode"]) for r in quick["sharpness"]["ratios"]}
    assert ratio_modes == {(m, mode) for m in ("vit", "convnext") for mode in ("case2", "saq", "saq_reuse_grad")}


def test_landscape_curve_passes_through_the_measured_loss_at_alpha_zero(quick):
    losses = {(r["model"], r["mode"]): r["loss"] for r in quick["sharpness"]["rows"]}
    for entry in quick["landscape"]["curves"]:
        curve = entry["curve"]
        assert len(curve["alphas"]) == 11
        middle = curve["alphas"].index(0.0)
        assert curve["losses"][middle] == pytest.approx(losses[(entry["model"], entry["mode"])], rel=1e-6)


def test_a_rerun_resumes_from_the_journal_and_reproduces_the_rows(quick):
    out = quick["out"].parent / "rerun"
    stdout = run("accuracy.py", "--quick", "--jobs", "1", "--cache", quick["cache"], "--out", out)
    assert "[  1/" not in stdout  # no run was trained again
    rerun = json.loads((out / "accuracy.json").read_text())
    assert rerun["rows"] == quick["accuracy"]["rows"]


def test_the_noisy_cells_report_from_the_journal_alone_and_count_what_is_missing(tmp_path):
    cache = tmp_path / "cache"
    run("regimes.py", "--quick", "--part", "noisy", "--jobs", "1", "--cache", cache, "--results", tmp_path / "ran")
    ran = json.loads((tmp_path / "ran" / "noisy_quick.json").read_text())
    assert ran["missing_runs"] == 0
    assert {r["mode"] for r in ran["rows"]} == {"qat", "saq", "saq_val", "qat_kd", "saq_kd"}
    # Distillation from each seed's own FP model: one teacher forward per micro-batch, the pairs of the report.
    kd = [r for r in ran["rows"] if r["mode"] in ("qat_kd", "saq_kd")]
    assert all(r["teacher"] == "fp" and r["distill_alpha"] == 1.0 and 0 < r["teacher_forwards"] <= r["steps"]
               for r in kd) and len(kd) == 4
    assert all(r["teacher"] is None for r in ran["rows"] if r not in kd)
    assert {(d["model"], *sorted(k for k in d if "-" in k)) for d in ran["distill"]} == \
        {(m, "qat_kd-qat", "saq-qat", "saq_kd-qat_kd") for m in ("vit", "convnext")}

    run("regimes.py", "--quick", "--part", "noisy", "--report", "--cache", cache, "--results", tmp_path / "report")
    report = json.loads((tmp_path / "report" / "noisy_quick.json").read_text())
    assert report["rows"] == ran["rows"] and report["val_chosen_rho"] == ran["val_chosen_rho"]
    assert (tmp_path / "report" / "noisy_map_quick.png").read_bytes()[:8] == PNG_MAGIC
    run("regimes.py", "--quick", "--part", "noisy", "--report", "--name", "distill", "--cache", cache, "--results",
        tmp_path / "report")
    assert json.loads((tmp_path / "report" / "distill_quick.json").read_text())["distill"] == report["distill"]
    assert (tmp_path / "report" / "distill_quick.png").read_bytes()[:8] == PNG_MAGIC

    # One mode's row gone from the journal: the report leaves it out and says so, it does not run it.
    journal = cache / "regimes_journal.jsonl"
    lines = journal.read_text().splitlines()
    kept = [line for line in lines if not (json.loads(line)["mode"] == "qat" and json.loads(line)["model"] == "vit")]
    assert len(kept) == len(lines) - 1
    journal.write_text("\n".join(kept) + "\n")
    run("regimes.py", "--quick", "--part", "noisy", "--report", "--cache", cache, "--results", tmp_path / "partial")
    partial = json.loads((tmp_path / "partial" / "noisy_quick.json").read_text())
    assert partial["missing_runs"] == 1 and len(partial["rows"]) == len(ran["rows"]) - 1
    assert len(journal.read_text().splitlines()) == len(lines) - 1


def test_transfer_distills_from_the_fp_model_fine_tuned_on_the_few_shot_images(tmp_path):
    """The transfer regime's FP model never saw digits: its teacher is that model fine-tuned in full precision on
    the images the student sees, trained once per seed and cached beside it."""
    from safetensors.torch import load_file

    cache = tmp_path / "cache"
    run("regimes.py", "--quick", "--part", "regimes", "--regimes", "transfer", "--modes", "qat,qat_kd,saq_kd",
        "--jobs", "1", "--cache", cache, "--results", tmp_path / "ran")
    ran = json.loads((tmp_path / "ran" / "transfer_quick.json").read_text())
    kd = [r for r in ran["rows"] if r["mode"] in ("qat_kd", "saq_kd")]
    assert len(kd) == 4 and all(r["teacher"] == "fp" and 0 < r["teacher_forwards"] <= r["steps"] for r in kd)
    assert all(0.0 <= r["teacher_accuracy"] <= 100.0 for r in kd)
    assert {d["regime"] for d in ran["distill"]} == {"transfer"}
    fp_models = sorted(p for p in (cache / "regimes_fp").iterdir())
    sources = [p for p in fp_models if "_ft_" not in p.name]
    tuned = [p for p in fp_models if "_ft_" in p.name]
    assert len(sources) == 2 and len(tuned) == 2  # one teacher per model and seed, shared by qat_kd and saq_kd
    for source in sources:
        teacher = next(p for p in tuned if p.name.startswith(source.name + "_ft_"))
        before, after = load_file(source / "model.safetensors"), load_file(teacher / "model.safetensors")
        assert before.keys() == after.keys()
        assert max((before[k] - after[k]).abs().max().item() for k in before) > 0  # it was trained
