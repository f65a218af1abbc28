"""The README tells the truth: its Python blocks run as written, and its demo table is in the form that
`make check-readme` (scripts/check_readme_demo.py) compares with a fresh demo run."""

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)


def load_checker():
    spec = importlib.util.spec_from_file_location("check_readme_demo", ROOT / "scripts" / "check_readme_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_readme_python_block_runs_as_written(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks write their output folders into the working directory
    exec(compile(PYTHON_BLOCKS[index], f"README.md python block {index}", "exec"), {"__name__": "__readme__"})


def test_readme_has_the_own_data_example_with_set_transform_collate_fn_and_the_offline_metric():
    (own,) = [block for block in PYTHON_BLOCKS if "set_transform" in block]
    for needed in ("datasets import Dataset", "collate_fn", "load_metric()", "remove_unused_columns=False",
                   "SAQTrainer("):
        assert needed in own


def test_readme_demo_table_has_the_three_rows_check_readme_compares():
    checker = load_checker()
    table = checker.readme_table(README)
    assert list(table) == list(checker.ROWS)
    for top1, top5 in table.values():
        assert re.fullmatch(r"\d+\.\d\d", top1) and re.fullmatch(r"\d+\.\d\d", top5)


def test_check_readme_formats_run_results_as_the_table_does():
    checker = load_checker()
    results = {key: {"accuracy": 0.958, "top5_accuracy": 1.0} for key in checker.ROWS.values()}
    assert set(checker.run_table(results).values()) == {("95.80", "100.00")}
