"""The README and the docs tell the truth: their Python blocks run as written (and the SAQ examples really run SAQ,
print no raw log dicts and leave no checkpoints behind), the demo table is in the form that `make check-readme`
(scripts/check_readme_demo.py) compares with a fresh demo run, and the test command is the one CI runs."""

import importlib.util
import re
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
DOCS = {path: path.read_text(encoding="utf-8") for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]}
PYTHON_BLOCKS = [(path.relative_to(ROOT), block) for path, text in DOCS.items()
                 for block in re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)]


def load_checker():
    spec = importlib.util.spec_from_file_location("check_readme_demo", ROOT / "scripts" / "check_readme_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("where, block", PYTHON_BLOCKS, ids=[f"{where}-{i}" for i, (where, _) in enumerate(PYTHON_BLOCKS)])
def test_python_block_runs_as_written_and_an_saq_example_runs_saq(where, block, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # blocks write their output folders into the working directory
    namespace = {"__name__": "__readme__"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile(block, f"{where} python block", "exec"), namespace)
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "untrained model" in m or "SAQ never started" in m], messages
    out = capsys.readouterr().out
    assert "{'loss'" not in out and "{'train_runtime'" not in out  # the Trainer's raw log dicts
    assert not list(tmp_path.rglob("checkpoint-*"))
    trainer = namespace.get("trainer")
    if trainer is not None and trainer.args.saq_mode != "qat":
        saq_steps = [log for log in trainer.state.log_history if "saq_ascent_loss" in log]
        assert trainer.saq_start_step == 0 and saq_steps  # SAQ trained from its first step


def test_readme_holds_the_quantize_and_saq_examples_and_the_guide_the_own_data_example():
    readme_blocks = [block for path, block in PYTHON_BLOCKS if path == Path("README.md")]
    assert len(readme_blocks) == 2 and "quantize_model(" in readme_blocks[0] and "SAQTrainer(" in readme_blocks[1]
    ((where, own),) = [(path, block) for path, block in PYTHON_BLOCKS if "set_transform" in block]
    assert where == Path("docs/GUIDE.md")
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


def test_readme_test_command_is_what_ci_runs():
    (tests_block,) = re.findall(r"## Tests\n\n```bash\n(.*?)```", README, flags=re.DOTALL)
    assert tests_block == "make test\n"
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert "make test" in ci


def test_docs_speak_of_the_software_not_of_its_history():
    history = re.compile(r"\bissues? \d|\bthis round\b|\bprevious round\b|\bcommit [0-9a-f]{7}|\b[0-9a-f]{7}\b commit"
                         r"|\blanding\b|\(was \d", re.IGNORECASE)
    found = {str(path.relative_to(ROOT)): history.findall(text) for path, text in DOCS.items()}
    assert {path: hits for path, hits in found.items() if hits} == {}


def test_readme_is_a_short_manual_that_links_the_docs():
    assert len(README.splitlines()) <= 200
    for doc in ("docs/GUIDE.md", "docs/RESULTS.md", "docs/SPEED.md", "docs/METHOD.md"):
        assert f"({doc}" in README and (ROOT / doc).is_file()
