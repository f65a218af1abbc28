"""The model card a stranger reads: install line, license, a usage snippet that runs on a real run folder (also on
greyscale and RGBA images), the warning about loading without saq-hf, and a failed push that changes nothing."""

import importlib.metadata
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from huggingface_hub import metadata_load
from PIL import Image

import saq_hf
import saq_hf.hub as hub
from saq_hf.cli import main
from saq_hf.hub import PushError, push_run_folder


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A real run folder: the shipped demo recipe, 2 FP steps and 2 SAQ steps on 20 held-out images."""
    root = tmp_path_factory.mktemp("card")
    status = main(["train", "demo_mnist_vit_w4a4", "--fp_max_steps", "2", "--max_steps", "2",
                   "--calibration_batches", "1", "--eval_strategy", "no", "--max_eval_samples", "20",
                   "--output_dir", str(root / "run"), "--fp_cache_dir", str(root / "fp_cache")])
    assert status == 0
    return root / "run"


def code_blocks(card: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", card, flags=re.DOTALL)


ROOT = Path(__file__).resolve().parents[1]
SOURCE = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Source"]


def test_card_installs_saq_hf_before_the_python_snippet_and_declares_a_license(run_dir):
    card = (run_dir / "README.md").read_text()
    (install,) = code_blocks(card, "bash")
    # This checkout is installed editable (pip's direct_url.json names a local folder): the card points a stranger
    # at the canonical source of pyproject.toml, at this version's release tag.
    assert install.strip() == f'pip install "saq-hf @ git+{SOURCE}@v{saq_hf.__version__}"'
    assert (f"If that fails, install saq-hf {saq_hf.__version__} from its source, {SOURCE} (a clone at tag "
            f"`v{saq_hf.__version__}`, then `pip install .`)") in card
    assert card.index("```bash") < card.index("```python")
    assert code_blocks(card, "python")[0].startswith("import saq_hf")
    assert metadata_load(run_dir / "README.md")["license"] == "apache-2.0"


def test_the_installed_metadata_names_the_source_of_pyproject_toml():
    (installed,) = [d for d in importlib.metadata.distributions(name="saq-hf") if d.read_text("INSTALLER")]
    assert installed.version == saq_hf.__version__
    assert f"Source, {SOURCE}" in installed.metadata.get_all("Project-URL")


def fake_install(folder: Path, direct_url: dict | None) -> importlib.metadata.Distribution:
    """An installed saq-hf 9.9.0 as pip leaves it: METADATA, INSTALLER, and direct_url.json unless from an index."""
    info = folder / "saq_hf-9.9.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.4\nName: saq-hf\nVersion: 9.9.0\n"
                                   "Project-URL: Source, https://example.org/team/saq-hf\n")
    (info / "INSTALLER").write_text("pip\n")
    if direct_url is not None:
        (info / "direct_url.json").write_text(json.dumps(direct_url))
    return importlib.metadata.PathDistribution(info)


@pytest.mark.parametrize("direct_url, command", [
    (None, "pip install saq-hf==9.9.0"),  # from an index
    ({"url": "https://example.org/fork/saq-hf.git", "vcs_info": {"vcs": "git", "commit_id": "0123abcd"}},
     'pip install "saq-hf @ git+https://example.org/fork/saq-hf.git@0123abcd"'),
    ({"url": "file:///home/me/saq-hf", "dir_info": {"editable": True}},
     'pip install "saq-hf @ git+https://example.org/team/saq-hf@v9.9.0"'),
    ({"url": "file:///tmp/dist/saq_hf-9.9.0-py3-none-any.whl", "archive_info": {}},
     'pip install "saq-hf @ git+https://example.org/team/saq-hf@v9.9.0"'),
], ids=["index", "git", "clone", "wheel-file"])
def test_install_line_follows_how_the_installed_package_was_installed(tmp_path, monkeypatch, direct_url, command):
    installed = fake_install(tmp_path, direct_url)
    stale = importlib.metadata.PathDistribution(tmp_path / "saq_hf.egg-info")  # a build's leftover: no INSTALLER
    monkeypatch.setattr(importlib.metadata, "distributions", lambda name: [stale, installed])
    line, fallback = hub.install_instructions()
    assert line == command
    assert fallback == ("If that fails, install saq-hf 9.9.0 from its source, https://example.org/team/saq-hf (a "
                        "clone at tag `v9.9.0`, then `pip install .`); without saq-hf the checkpoint loads "
                        "unquantized (below).")


@pytest.mark.parametrize("mode", ["L", "RGBA", "RGB"])
def test_card_usage_snippet_predicts_a_class_for_greyscale_rgba_and_rgb_images(run_dir, tmp_path, monkeypatch, mode,
                                                                               capsys):
    snippet = code_blocks((run_dir / "README.md").read_text(), "python")[0]
    assert 'from_pretrained("path/to/run")' in snippet
    Image.new(mode, (28, 28), color=200 if mode == "L" else (200,) * len(mode)).save(tmp_path / "image.png")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(snippet.replace("path/to/run", str(run_dir)), namespace)
    assert namespace["predicted"] in {str(digit) for digit in range(10)}
    assert capsys.readouterr().out.splitlines()[-1] == namespace["predicted"]  # the snippet prints its answer


def test_card_warns_that_transformers_alone_loads_the_model_unquantized(run_dir):
    card = (run_dir / "README.md").read_text()
    assert "Without `import saq_hf`" in card and "*unquantized*" in card
    # What the warning claims, checked in a process that never imports saq_hf.
    code = ("from transformers import AutoModelForImageClassification as A; "
            f"m = A.from_pretrained({str(run_dir)!r}); "
            "print(sum('Quantizer' in type(x).__name__ for x in m.modules()))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "0"
    assert "Unknown quantization type, got saq" in done.stderr


class FailingApi:
    def __init__(self, token=None):
        pass

    def create_repo(self, repo_id, private=None, exist_ok=False):
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(self, **kwargs):
        raise ConnectionError("Max retries exceeded with url: https://huggingface.co/api")


def test_failed_push_leaves_every_file_of_the_run_folder_byte_identical(run_dir, monkeypatch):
    monkeypatch.setattr(hub, "HfApi", FailingApi)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(PushError, match="retry with: saq-hf push"):
        push_run_folder(run_dir, "someone/renamed-model")
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    assert "renamed-model" not in (run_dir / "README.md").read_text()


def test_successful_push_uploads_the_card_for_the_repo_and_then_updates_the_local_one(run_dir, monkeypatch,
                                                                                   tmp_path):
    uploaded = {}

    class Api(FailingApi):
        def upload_folder(self, repo_id, folder_path, **kwargs):
            uploaded.update({p.name: p.read_bytes() for p in Path(folder_path).rglob("*") if p.is_file()})
            return type("Commit", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/1"})()

    copy = tmp_path / "run"
    copy.mkdir()
    for path in run_dir.iterdir():
        if path.is_file():
            (copy / path.name).write_bytes(path.read_bytes())
    monkeypatch.setattr(hub, "HfApi", Api)
    push_run_folder(copy, "someone/demo-w4a4")
    assert b'from_pretrained("someone/demo-w4a4")' in uploaded["README.md"]
    assert uploaded["README.md"] == (copy / "README.md").read_bytes()
    assert uploaded["model.safetensors"] == (copy / "model.safetensors").read_bytes()
