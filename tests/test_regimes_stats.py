"""benchmarks/regimes.py's protocol: seed-paired differences to QAT with a 95 % t-interval, validation-only ρ."""

import sys
from dataclasses import replace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import digits  # noqa: E402
import regime_run  # noqa: E402
import regimes  # noqa: E402
import regimes_report  # noqa: E402
import stats  # noqa: E402


def row(mode, seed, accuracy, regime="scratch", model="vit", bits=2, seconds=1.0):
    return {"regime": regime, "model": model, "w_bits": bits, "mode": mode, "seed": seed, "accuracy": accuracy,
            "val_accuracy": accuracy, "rho": 0.0 if mode == "qat" else 0.002, "train_seconds": seconds}


def test_t_interval_matches_the_textbook_value():
    # mean 2, sample std 1, n = 3: half width t(0.975, 2) * 1 / sqrt(3) = 4.3027 / 1.7321 = 2.4841
    mean, low, high = stats.t_interval([1.0, 2.0, 3.0])
    assert mean == pytest.approx(2.0)
    assert high - mean == pytest.approx(2.4841, abs=1e-3)
    assert mean - low == pytest.approx(2.4841, abs=1e-3)


def test_differences_to_qat_are_paired_by_seed():
    # SAQ is exactly 1 pt above QAT on every seed while both vary a lot across seeds: paired, the interval is 0.
    rows = [row("qat", s, 80.0 + 5 * s) for s in range(3)] + \
        [row("saq", s, 81.0 + 5 * s, seconds=2.0) for s in range(3)]
    summary = {s["mode"]: s for s in stats.summarize(rows, ("regime", "model", "w_bits"))}
    assert summary["saq"]["delta_vs_qat"] == pytest.approx(1.0)
    assert summary["saq"]["delta_ci95"] == pytest.approx([1.0, 1.0])
    assert summary["saq"]["accuracy_std"] == pytest.approx(5.0)
    assert summary["saq"]["cost_vs_qat"] == pytest.approx(2.0)
    assert summary["qat"]["delta_vs_qat"] == pytest.approx(0.0)


def test_the_validation_sweep_never_uses_a_reported_seed():
    plan = regimes.FULL
    assert not set(plan.sweep_seeds) & set(plan.seeds)
    assert regimes.FIXED_RHO in plan.val_grid


def test_validation_rows_reuse_the_default_runs_only_where_validation_chose_the_default():
    plan = regimes.FULL
    arch = digits.Arch("vit", 64, 2)
    # The radius is chosen per cell: regime, model and bits.
    chosen = {(regime, arch.name, bits): regimes.FIXED_RHO for regime in plan.regimes for bits in plan.bits}
    chosen[("transfer", arch.name, 3)] = 0.005
    other = {(r, "convnext-64", b): 0.001 for r in plan.regimes for b in plan.bits}
    runs = regimes.main_runs(plan, {}, {**chosen, **other})
    val_runs = [r for r in runs if r.mode == "saq_val" and r.arch == arch]
    assert {(r.regime, r.bits) for r in val_runs} == {("transfer", 3)} and {r.rho for r in val_runs} == {0.005}
    saq_rows = [dict(row("saq_fixed", 0, 90.0, regime=reg), model="vit", width=64, w_bits=b, key=f"k{reg}{b}")
                for reg in plan.regimes for b in (2, 3)]
    relabelled = [r for r in regimes.with_val_rows(saq_rows, plan, chosen) if r["mode"] == "saq_val"]
    assert {(r["regime"], r["w_bits"]) for r in relabelled} == \
        {("scratch", 2), ("scratch", 3), ("long_qat", 2), ("long_qat", 3), ("transfer", 2)}


def test_a_validation_tie_goes_to_the_smaller_radius_even_when_float_sums_differ_in_the_last_bit():
    # The same number of correct validation images, averaged over seeds in another order: equal, not 1e-14 apart.
    assert regimes.best_radius({0.005: 74.3, 0.01: 75.41899441340782, 0.02: 75.41899441340783}) == 0.01
    assert regimes.best_radius({0.01: 50.837988826815646, 0.02: 50.83798882681564}) == 0.01
    assert regimes.best_radius({0.01: 75.4, 0.02: 75.6}) == 0.02


@pytest.mark.parametrize("flag, value", [("--noisy_bits", "3,x"), ("--noisy_bits", "1"), ("--noise_rates", "0.2,abc")])
def test_a_bad_noisy_cell_list_is_one_line_before_any_run(flag, value, tmp_path):
    with pytest.raises(SystemExit, match=f"regimes.py: {flag} takes comma-separated"):
        regimes.main(["--part", "noisy", flag, value, "--cache", str(tmp_path / "c"), "--results", str(tmp_path / "r")])
    assert not (tmp_path / "c").exists() and not (tmp_path / "r").exists()


def test_the_distillation_pairs_are_seed_paired_against_their_own_baseline():
    rows = [row("qat", s, 80.0 + 5 * s, regime="long_qat") for s in range(3)] + \
        [row("qat_kd", s, 83.0 + 5 * s + (s == 2), regime="long_qat") for s in range(3)] + \
        [row("saq_kd", s, 84.0 + 5 * s + (s == 2), regime="long_qat") for s in range(3)] + \
        [row("saq", s, 80.5 + 5 * s, regime="long_qat") for s in range(2)]  # seed 2 missing: n 2
    (cell,) = regimes_report.distill_pairs(rows, ("regime", "model", "w_bits"))
    assert cell["qat_accuracy"] == pytest.approx(85.0) and cell["qat_n"] == 3
    assert cell["qat_kd-qat"]["delta"] == pytest.approx(10 / 3) and cell["qat_kd-qat"]["n"] == 3
    assert cell["saq_kd-qat_kd"]["ci95"] == pytest.approx([1.0, 1.0])
    assert cell["saq-qat"]["delta"] == pytest.approx(0.5) and cell["saq-qat"]["n"] == 2


def test_a_distillation_run_is_keyed_apart_and_needs_an_fp_model(monkeypatch):
    arch, schedule = digits.Arch("vit", 64, 2), digits.Schedule(20, 5e-4, 128)

    def key(mode):
        return regime_run.Run("long_qat", arch, 2, mode, 0, schedule, fp_path="/fp/vit", fp_seed=0).key()

    plain, kd = key("qat"), key("qat_kd")
    assert plain != kd
    # The library's distillation defaults are part of a KD run's key, and of no other run's.
    assert "distill_alpha" in regime_run.effective_settings("saq_kd")
    assert "distill_alpha" not in regime_run.effective_settings("saq")
    defaults = regime_run.library_defaults

    def changed(prefixes=("saq_", "rho", "step_size_")):
        out = defaults(prefixes)
        return {**out, "distill_alpha": 0.5} if "distill_alpha" in out else out

    monkeypatch.setattr(regime_run, "library_defaults", changed)
    assert key("qat_kd") != kd and key("qat") == plain
    # From scratch there is no FP model to teach: the map plans no KD run there.
    runs = regimes.main_runs(replace(regimes.FULL, modes=("qat", "qat_kd", "saq_kd")), {}, {})
    assert {r.regime for r in runs if r.mode in ("qat_kd", "saq_kd")} == {"long_qat", "transfer"}


def test_a_run_key_follows_the_step_size_scale_and_the_radius_rule(monkeypatch):
    from saq_hf.sharpness import LossDrivenRadius

    arch, schedule = digits.Arch("vit", 64, 2), digits.Schedule(20, 5e-4, 128)

    def key(mode):
        return regime_run.Run("long_qat", arch, 2, mode, 0, schedule, fp_path="/fp/vit", fp_seed=0).key()

    assert regime_run.effective_settings("saq")["step_size_lr_scale"] == 30.0
    assert regime_run.effective_settings("saq")["rho"] == "auto"  # the map's saq rows are the library's defaults
    before = {mode: key(mode) for mode in ("saq", "saq_fixed", "auto_l50_f05")}
    assert len(set(before.values())) == 3  # a rule variant is keyed apart from the default rule
    regime_run._LIBRARY_RULE.clear()
    monkeypatch.setattr(LossDrivenRadius, "FALL_ZERO", 0.3)
    try:
        assert key("saq") != before["saq"] and key("saq_fixed") == before["saq_fixed"]
    finally:
        regime_run._LIBRARY_RULE.clear()
