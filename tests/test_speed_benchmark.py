"""``benchmarks/speed.py --quick`` end to end on one small config: every ratio it reports, its goals and a PNG."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_speed_run_reports_ratios_goals_and_peers(tmp_path):
    out = tmp_path / "speed.json"
    modes = "fp,qat,saq,reuse_grad,torch_lsq"
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
            "qat_over_torch_lsq_time"} <= set(entry["ratios"])
    assert entry["ratios"]["qat_over_fp_time"] == entry["modes"]["qat"]["step_ms"] / entry["modes"]["fp"]["step_ms"]
    assert report["goals"]["qat_over_fp_time"]["goal"] == 1.25
    # The memory goal applies at batch >= 32 and --quick halves the batch to 16.
    assert "saq_over_qat_memory" not in report["goals"]
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "qat/fp" in done.stdout and "qat/torch_lsq" in done.stdout
