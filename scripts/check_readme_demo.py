"""Fail when the README's demo table differs from a fresh demo run.

    python scripts/check_readme_demo.py                  # trains the demo from scratch (~1.5 min on 2 cores)
    python scripts/check_readme_demo.py --run-dir DIR    # compares with an existing run folder's saq_run.json

The table sits under the `demo-results` marker in README.md's Quick start; each row's top-1/top-5 must equal the
run's ``results`` (rounded to two decimals, as `saq-hf train` prints them). The fresh run uses its own FP cache,
so a stale cached FP model cannot hide a change.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKER = "<!-- demo-results:"
ROWS = {"full precision": "fp", "W4A4 calibrated, no training": "quantized_calibrated",
        "W4A4 after training": "quantized"}


def readme_table(readme: str) -> dict[str, tuple[str, str]]:
    """``{row label: (top-1, top-5)}`` of the table right after the marker."""
    if MARKER not in readme:
        raise SystemExit(f"README.md has no {MARKER!r} marker above the demo table")
    lines = readme[readme.index(MARKER):].splitlines()[1:]
    table = {}
    for line in lines:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if cells[0] in ROWS:
            table[cells[0]] = (cells[1], cells[2])
    return table


def run_table(results: dict) -> dict[str, tuple[str, str]]:
    return {label: (f"{100 * results[key]['accuracy']:.2f}", f"{100 * results[key]['top5_accuracy']:.2f}")
            for label, key in ROWS.items()}


def fresh_demo(work: Path) -> Path:
    run_dir = work / "run"
    command = [sys.executable, "-m", "saq_hf", "train", str(ROOT / "recipes" / "demo_mnist_vit_w4a4.yaml"),
               "--output_dir", str(run_dir), "--fp_cache_dir", str(work / "fp_cache")]
    print("running:", " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=ROOT)
    return run_dir


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, help="compare with this finished demo run instead of training one")
    ns = parser.parse_args()
    readme = readme_table((ROOT / "README.md").read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory(prefix="saq-hf-readme-") as work:
        run_dir = ns.run_dir or fresh_demo(Path(work))
        results = json.loads((run_dir / "saq_run.json").read_text(encoding="utf-8"))["results"]
    fresh = run_table(results)
    wrong = [f"  {label}: README {readme.get(label, ('missing', 'missing'))}, run {fresh[label]} (top-1, top-5)"
             for label in ROWS if readme.get(label) != fresh[label]]
    if wrong:
        print("README.md's demo table differs from the run:\n" + "\n".join(wrong), file=sys.stderr)
        return 1
    print(f"README.md's demo table matches {run_dir / 'saq_run.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
