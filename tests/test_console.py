"""What `saq-hf` prints: one bar per training stage and the summary table, no raw log dicts, nested evaluation bars,
weight-loading bars or pin_memory warnings; the logs in train_log.json; eval explains a missing FP row and shows
progress while it measures sharpness; small report splits are called out."""

import contextlib
import io
import json
import shutil
import warnings

import pytest

from saq_hf.cli import main


@pytest.fixture(scope="module")
def demo_output(tmp_path_factory):
    """The demo recipe, 3 FP + 3 SAQ steps, logging and evaluating during training: the run folder's parent,
    stdout, stderr and the warnings raised."""
    root = tmp_path_factory.mktemp("console")
    argv = ["train", "demo_mnist_vit_w4a4", "--fp_max_steps", "3", "--max_steps", "3", "--calibration_batches", "1",
            "--logging_steps", "1", "--eval_strategy", "steps", "--eval_steps", "2", "--max_eval_samples", "20",
            "--disable_tqdm", "false", "--output_dir", str(root / "run"), "--fp_cache_dir", str(root / "fp"),
            "--saq_start_ratio", "0"]  # 3 FP steps leave the model untrained: SAQ from the first step anyway
    out, err = io.StringIO(), io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(err):
        warnings.simplefilter("always")
        assert main(argv) == 0
    return root, out.getvalue(), err.getvalue(), [str(w.message) for w in caught]


def test_train_shows_one_bar_per_stage_and_a_table_but_no_log_dicts_or_nested_bars(demo_output):
    _, out, err, _ = demo_output
    console = out + err
    assert "{'loss'" not in console and "{'eval_loss'" not in console
    assert "\x1b[A" not in console  # nested evaluation bars move the cursor up
    assert "Loading weights" not in console and "Writing model shards" not in console
    assert "Flattening the indices" not in console and "examples/s" not in console  # datasets' own bars
    assert "full precision: 100%" in err and "W4A4 saq: 100%" in err
    table = out[out.index("model "):].splitlines()
    assert [line.split("  ")[0] for line in table[1:4]] == ["full precision", "W4A4 calibrated, no training",
                                                            "W4A4 after training"]


def test_train_raises_no_pin_memory_warning_on_a_machine_without_an_accelerator(demo_output):
    assert not [message for message in demo_output[3] if "pin_memory" in message]


def test_train_log_json_holds_both_stages_log_history(demo_output):
    root = demo_output[0]
    log = json.loads((root / "run" / "train_log.json").read_text())
    assert set(log) == {"full_precision", "quantized"}
    for stage in log.values():
        assert [entry["step"] for entry in stage if "loss" in entry] == [1, 2, 3]
        assert any("eval_accuracy" in entry for entry in stage)
    assert any("saq_eps_norm" in entry for entry in log["quantized"])


def test_a_report_split_under_100_images_is_called_out(demo_output):
    assert "warning: the test split has only 20 images, so one image is 5.0 points of accuracy" in demo_output[2]


def test_eval_says_why_the_fp_row_is_missing_when_the_fp_cache_is_gone(demo_output, capsys):
    root = demo_output[0]
    fp_model = json.loads((root / "run" / "saq_run.json").read_text())["fp_model"]
    shutil.rmtree(fp_model)
    assert main(["eval", str(root / "run"), "--max_eval_samples", "20"]) == 0
    out = capsys.readouterr().out
    (fp_row,) = [line for line in out.splitlines() if line.startswith("full precision")]
    assert fp_row.split()[2:4] == ["n/a", "n/a"]
    assert fp_row.endswith(f"({fp_model} no longer exists (FP cache cleared?); rerun the recipe to rebuild it)")
    assert "W4A4 after training" in out


def test_eval_sharpness_shows_a_progress_bar(demo_output, capsys):
    root = demo_output[0]
    assert main(["eval", str(root / "run"), "--max_eval_samples", "20", "--sharpness", "--sharpness_batches", "1",
                 "--batch_size", "10"]) == 0
    captured = capsys.readouterr()
    assert "sharpness: 100%" in captured.err and "28/28" in captured.err
    assert "top Hessian eigenvalue" in captured.out


def test_an_unreachable_hub_switches_to_cached_files_and_fails_in_one_line_naming_hf_hub_offline(
        monkeypatch, capfd, tmp_path):
    import socket

    import datasets.config
    import huggingface_hub.constants

    with socket.socket() as probe:  # a port nobody listens on: the connection is refused at once
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    capfd.readouterr()
    status = main(["train", "vit_b16_pets_w4a4", "--model_name_or_path", "nobody/no-such-model",
                   "--output_dir", str(tmp_path / "run")])
    err = capfd.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1
    assert err[0].startswith("saq-hf: error: could not load model 'nobody/no-such-model'") and "HF_HUB_OFFLINE=1" in err[0]
    assert huggingface_hub.constants.HF_HUB_OFFLINE and datasets.config.HF_HUB_OFFLINE  # no retries: offline mode
    assert not (tmp_path / "run").exists()


def test_saq_hf_warnings_print_as_one_line_and_others_keep_pythons_format():
    from saq_hf.console import SAQHfWarning

    assert warnings.formatwarning("SAQ never started: x", SAQHfWarning, "trainer.py", 7) == (
        "[saq-hf] warning: SAQ never started: x\n")
    assert warnings.formatwarning("other", UserWarning, "t.py", 7, "line") == "t.py:7: UserWarning: other\n  line\n"


def test_saq_never_started_is_a_saq_hf_warning_line_on_stderr_not_a_python_warning(tmp_path):
    import subprocess
    import sys

    # One FP step leaves the model untrained, so SAQ waits for a fit that two steps never bring.
    done = subprocess.run(
        [sys.executable, "-m", "saq_hf", "train", "demo_mnist_vit_w4a4", "--fp_max_steps", "1", "--max_steps", "2",
         "--calibration_batches", "1", "--eval_strategy", "no", "--max_eval_samples", "20",
         "--output_dir", str(tmp_path / "run"), "--fp_cache_dir", str(tmp_path / "fp")],
        capture_output=True, text=True, timeout=600, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if "SAQ never started" in line]
    assert len(lines) == 1 and lines[0].startswith("[saq-hf] warning: SAQ never started: the training loss never")
    assert "UserWarning" not in done.stderr and "warn(" not in done.stderr


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_the_first_step_which_compiles_kernels_does_not_set_the_eta(monkeypatch):
    from types import SimpleNamespace

    from saq_hf.progress import StageProgress

    clock = FakeClock()
    monkeypatch.setattr("tqdm.std.time", clock)  # the clock each bar takes when it is made
    progress = StageProgress("W4A4 saq", log_stage="quantized")
    args, state = SimpleNamespace(disable_tqdm=False), SimpleNamespace(max_steps=101, global_step=0,
                                                                       is_world_process_zero=True)
    with contextlib.redirect_stderr(io.StringIO()):
        progress.on_train_begin(args, state, None)
        clock.now += 600  # the first step: ten minutes of kernel compilation
        state.global_step = 1
        progress.on_step_end(args, state, None)
        assert progress.bar.n == 1 and progress.bar.format_dict["rate"] is None
        assert "1/101 [00:00<?" in str(progress.bar)  # no ETA yet rather than 100 x 10 minutes
        for _ in range(2):  # then 0.5 s a step
            clock.now += 0.5
            state.global_step += 1
            progress.on_step_end(args, state, None)
        assert progress.bar.format_dict["rate"] == pytest.approx(2.0)  # 98 steps left: an ETA of 49 s, not 16 h
        progress.bar.close()
