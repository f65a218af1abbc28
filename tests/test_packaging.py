"""What a stranger gets from a clone: one version, package data in the wheel's globs, a Makefile that installs only
when pyproject.toml changes, the method document every reference points to, and `saq-hf train RECIPE --help`.
The wheel itself is built, installed into a fresh venv and run by `.ci/check_wheel` (`make check-wheel`)."""

import fnmatch
import os
import re
import subprocess
import tomllib
from pathlib import Path

import pytest

import saq_hf
from saq_hf.cli import main

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def tracked_text_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return [ROOT / name for name in names
            if Path(name).suffix in (".py", ".md", ".yaml", ".toml", ".txt", "") and (ROOT / name).is_file()]


def test_version_is_written_once_in_saq_hf_init():
    assert "version" not in PYPROJECT["project"] and PYPROJECT["project"]["dynamic"] == ["version"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "saq_hf._version.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", saq_hf.__version__)


def test_package_data_globs_cover_the_card_template_metric_module_and_every_recipe():
    patterns = PYPROJECT["tool"]["setuptools"]["package-data"]["saq_hf"]
    package = ROOT / "saq_hf"
    needed = ["hub_cards/model_card.md", "metrics/top_k_accuracy/top_k_accuracy.py",
              *(f"recipes/{p.name}" for p in (ROOT / "recipes").glob("*.yaml"))]
    for name in needed:
        assert (package / name).is_file(), name
        assert any(fnmatch.fnmatch(name, pattern) for pattern in patterns), name


def test_make_installs_only_when_pyproject_toml_is_newer_than_the_last_install(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").touch()
    stamp = venv / ".installed"
    stamp.touch()
    pyproject_time = (ROOT / "pyproject.toml").stat().st_mtime

    def planned() -> str:
        return subprocess.run(["make", "-n", "install", f"VENV={venv}"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout

    os.utime(stamp, (pyproject_time + 10, pyproject_time + 10))
    assert "pip install" not in planned()
    os.utime(stamp, (pyproject_time - 10, pyproject_time - 10))
    assert 'pip install -q -e ".[dev]"' in planned()


def test_method_document_has_every_section_and_every_reference_points_to_it():
    method = (ROOT / "docs/METHOD.md").read_text()
    for section in ("## The three cases", "## One SAQ step", "## The quantizer", "## The radius ρ",
                    "## Efficient strategies and their cost"):
        assert section in method
    for path in tracked_text_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        assert not re.search(r"(?<![\w/])METHOD\.md", text), f"{path.relative_to(ROOT)}: write docs/METHOD.md"


def test_no_tracked_file_refers_to_files_outside_the_repository():
    shared = "shared"  # spelled apart, so this test does not find itself
    outside = re.compile(rf"\.\./{shared}|/work/{shared}|{shared}/docs/")
    offenders = [str(p.relative_to(ROOT)) for p in tracked_text_files()
                 if outside.search(p.read_text(encoding="utf-8", errors="replace"))]
    assert offenders == []


def test_train_recipe_help_lists_fields_by_group_with_type_default_and_the_recipe_value(capsys):
    assert main(["train", "recipes/demo_mnist_vit_w4a4.yaml", "--help"]) == 0
    out = capsys.readouterr().out
    headings = [line for line in out.splitlines() if re.fullmatch(r"\w+:", line)]
    assert headings == ["model:", "data:", "quantization:", "SAQ:", "training:"]
    assert "  --w_bits  (int; default: 4)  recipe: 4\n      Weight bit-width, 2..8." in out
    assert "  --torch_num_threads  (int or null; default: null)  recipe: 1\n" in out
    assert "  --random_flip  (bool; default: true)  recipe: false\n" in out
    saq = out[out.index("\nSAQ:"):out.index("\ntraining:")]
    assert "--saq_mode" in saq and "--rho" in saq and "--learning_rate" not in saq
    assert "  --learning_rate  (float; default: 5e-05)  recipe: 0.0005\n" in out


def test_a_shipped_recipe_runs_by_name_and_an_unknown_one_lists_the_shipped_names(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # as after `pip install saq-hf`: no recipes/ folder here
    assert main(["train", "demo_mnist_vit_w4a4", "-h"]) == 0
    assert "usage: saq-hf train" in capsys.readouterr().out
    assert main(["train", "recipes/demo_mnist_vit_w4a4.yaml", "--help"]) == 0
    capsys.readouterr()
    assert main(["train", "no_such_recipe"]) == 2
    assert capsys.readouterr().err.strip() == (
        "saq-hf: error: recipe 'no_such_recipe' not found (recipes shipped with saq-hf: convnext_tiny_flowers_w4a4, "
        "convnext_tiny_pets_w4a4, demo_mnist_vit_w4a4, vit_b16_flowers_w4a4, vit_b16_pets_w4a4)")


@pytest.mark.parametrize("flowers", ["vit_b16_flowers_w4a4.yaml", "convnext_tiny_flowers_w4a4.yaml"])
def test_flowers_recipes_say_that_the_test_split_is_most_of_the_download(flowers):
    assert "~3 GB is the 6,149-image test split" in (ROOT / "recipes" / flowers).read_text()
