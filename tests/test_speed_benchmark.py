"""``benchmarks/speed.py --quick`` end to end on one small config: every ratio it reports, its goals and a PNG."""

import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_quick_speed_run_reports_ratios_goals_and_peers(tmp_path):
    out = tmp_path / "speed.json"
    modes = "fp,qat,saq,reuse_grad,torch_lsq,qat_kd"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--quick", "--configs", "convnext-tiny",
                           "--modes", modes, "--warmup", "1", "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    entry = report["results"]["convnext-tiny"]
    assert set(entry["modes"]) == set(modes.split(","))
    for mode in entry["modes"].values():
        assert mode["step_ms"] > 0 and mode["peak_mib"] > 0
    assert {"qat_over_fp_time", "saq_over_qat_time", "saq_over_qat_memory", "reuse_grad_over_qat_memory",
            "qat_over_torch_lsq_time", "qat_kd_over_qat_time"} <= set(entry["ratios"])
    assert entry["ratios"]["qat_over_fp_time"] == entry["modes"]["qat"]["step_ms"] / entry["modes"]["fp"]["step_ms"]
    assert report["goals"]["qat_over_fp_time"]["goal"] == 1.25
    assert report["goals"]["qat_kd_over_qat_time"]["goal"] == 1.35  # one teacher forward, no backward
    # The memory goal applies at batch >= 32 and --quick halves the batch to 16.
    assert "saq_over_qat_memory" not in report["goals"]
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "qat/fp" in done.stdout and "qat/torch_lsq" in done.stdout


def test_profile_step_reports_step_time_cpu_side_and_top_ops(tmp_path):
    out = tmp_path / "profile.txt"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "profile_step.py"), "--config", "vit-tiny",
                           "--steps", "2", "--rows", "60", "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = out.read_text()
    for mode in ("fp", "qat"):
        line = next(line for line in report.splitlines() if line.startswith(f"== {mode}: step "))
        assert float(line.split("step ")[1].split(" ms")[0]) > 0 and "CPU side" in line
    # The QAT step's quantizers: the weights' multi-tensor node and one op per activation quantizer.
    qat = report.split("== qat")[1]
    assert "_LSQFakeQuantizeMany" in qat and "_LSQFakeQuantizeBackward" in qat
    assert "_LSQFakeQuantize" not in report.split("== qat")[0]


def test_compile_check_passes_here_and_fails_when_the_compiled_backward_drops_gradients(monkeypatch, capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import compile_check

    from saq_hf.quant import lsq

    assert compile_check.main(["--devices", "cpu", "--backends", "aot_eager"]) == 0
    backward = lsq._LSQFakeQuantize.backward

    def dropped(ctx, grad_output):  # what torch 2.11's dynamo made of the op's backward
        grads = backward(ctx, grad_output)
        return (torch.zeros_like(grads[0]), torch.zeros_like(grads[1])) + tuple(grads[2:])

    # Compiled code traces the patched backward; eager runs it too, so patch only while compiling.
    monkeypatch.setattr(lsq._LSQFakeQuantize, "backward", staticmethod(
        lambda ctx, g: dropped(ctx, g) if torch.compiler.is_compiling() else backward(ctx, g)))
    assert compile_check.main(["--devices", "cpu", "--backends", "aot_eager"]) == 1
    printed = capsys.readouterr().out
    assert "FAIL [cpu aot_eager] op step_grad=True" in printed and "FAIL [cpu aot_eager] tiny ViT" in printed


def test_compile_check_refuses_an_unknown_device_or_backend_in_one_line():
    for flag, value, message in (("--devices", "tpu", "--devices 'tpu': use cpu"),
                                 ("--backends", "nope", "unknown backend(s) ['nope']")):
        done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compile_check.py"), flag, value],
                              capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert done.returncode == 2 and message in done.stderr.strip().splitlines()[-1], done.stderr[-500:]
        assert "torch " not in done.stdout  # refused before any check ran
