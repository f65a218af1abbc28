"""``saq-hf``: train a recipe, evaluate a run folder, push it to the Hub, export integer weights, search bit-widths.

A thin shell over :mod:`saq_hf.run`, :mod:`saq_hf.evaluate`, :mod:`saq_hf.export` and :mod:`saq_hf.hub`. Each subcommand is a ``_add_<name>`` function that
declares its arguments and a handler returning the exit status; bad input (a :class:`UserInputError`) becomes
one line on stderr and exit status 2.
"""

import argparse
import dataclasses
import os
import shlex
import sys
import textwrap
import typing
from pathlib import Path

from .args import UserInputError

BUNDLED_RECIPES = Path(__file__).parent / "recipes"
# Training fields listed by `saq-hf train RECIPE --help` even when the recipe leaves them at their default; the
# other ~100 TrainingArguments fields are listed only when the recipe sets them.
COMMON_TRAINING_FIELDS = ("output_dir", "num_train_epochs", "max_steps", "learning_rate", "weight_decay", "optim",
                          "lr_scheduler_type", "warmup_steps", "per_device_train_batch_size",
                          "per_device_eval_batch_size", "gradient_accumulation_steps", "eval_strategy",
                          "save_strategy", "logging_steps", "seed", "bf16", "fp16", "push_to_hub", "hub_model_id")


def _recipe_path(recipe: str) -> Path:
    """``recipe`` itself, or the recipe of that name shipped with saq-hf (``demo_mnist_vit_w4a4``, or
    ``recipes/demo_mnist_vit_w4a4.yaml`` outside the checkout), so an installed wheel runs the README's commands."""
    path = Path(recipe)
    if path.is_file():
        return path
    bundled = BUNDLED_RECIPES / (path.name if path.suffix in (".yaml", ".yml") else path.name + ".yaml")
    if bundled.is_file():
        return bundled
    names = ", ".join(sorted(p.stem for p in BUNDLED_RECIPES.glob("*.yaml")))
    raise UserInputError(f"recipe {recipe!r} not found (recipes shipped with saq-hf: {names})")


def _recipe_groups():
    from .args import DataArguments, ModelArguments, QuantArguments
    from .training_args import SAQTrainingArguments

    saq_fields = [f.name for f in dataclasses.fields(SAQTrainingArguments) if f.name.startswith(("saq_", "rho", "distill_"))]
    return (("model", ModelArguments, None), ("data", DataArguments, None), ("quantization", QuantArguments, None),
            ("SAQ", SAQTrainingArguments, saq_fields), ("training", SAQTrainingArguments, "rest"))


def recipe_help(recipe: str | Path, values: dict, source: str | Path | None = None) -> str:
    """Every recipe field grouped (model, data, quantization, SAQ, training) with type, default, help and the
    value ``values`` (the recipe's YAML) sets; training lists the common fields and those the recipe sets."""
    from .args import _type_name

    lines = [f"usage: saq-hf train {recipe} [--field value ...]", "",
             f"Fields of {source or recipe}.",
             "`recipe:` is the value the recipe sets; a --field flag on the command line overrides it. Every",
             "transformers TrainingArguments field is accepted; training lists the common ones and the recipe's."]
    saq_names: set[str] = set()
    for title, dtype, names in _recipe_groups():
        hints = typing.get_type_hints(dtype)
        fields = {f.name: f for f in dataclasses.fields(dtype) if f.init}
        if names == "rest":
            names = [n for n in fields if n not in saq_names and (n in COMMON_TRAINING_FIELDS or n in values)]
        elif names is None:
            names = list(fields)
        else:
            saq_names = set(names)
        lines += ["", f"{title}:"]
        for name in names:
            f = fields[name]
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            default = getattr(default, "value", default)
            type_text = _type_name(hints.get(name, f.type))
            if len(type_text) > 60:  # optim and lr_scheduler_type name dozens of choices
                type_text = ", ".join(type_text.split(", ")[:4]) + ", ..."
            line = f"  --{name}  ({type_text}; default: {_yaml_value(default)})"
            if name in values:
                line += f"  recipe: {_yaml_value(values[name])}"
            lines.append(line)
            help_text = " ".join(str(f.metadata.get("help", "")).split())
            if help_text:
                lines += textwrap.wrap(help_text, width=110, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)


def _yaml_value(value) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _train(ns: argparse.Namespace) -> int:
    import yaml

    from . import run
    from .args import DataArguments, ModelArguments, QuantArguments, parse_recipe
    from .evaluate import format_results
    from .hub import work_offline_if_hub_unreachable
    from .loading import DISTILL_FP
    from .run_folder import interrupted
    from .training_args import SAQTrainingArguments

    recipe = _recipe_path(ns.recipe)
    if "--help" in ns.overrides or "-h" in ns.overrides:
        try:
            values = yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError:
            values = {}
        print(recipe_help(ns.recipe, values if isinstance(values, dict) else {}, source=recipe))
        return 0
    recipe_args = parse_recipe(recipe, ns.overrides,
                               (ModelArguments, DataArguments, QuantArguments, SAQTrainingArguments))
    model_args, data_args, _, training_args = recipe_args
    if _uses_hub(model_args.model_name_or_path, data_args.dataset_name) or training_args.push_to_hub or \
            model_args.distill != DISTILL_FP and _uses_hub(model_args.distill, None):
        work_offline_if_hub_unreachable()
    try:
        result = run.train(run.prepare(*recipe_args))
    except KeyboardInterrupt:
        print(f"saq-hf: {interrupted(training_args, _train_command(ns))}", file=sys.stderr)
        return INTERRUPTED
    info = result.run_info
    results, training = info["results"], info["training"]
    print(f"\nsaq-hf run {result.output_dir}: {info['quantization']['tag']}, saq_mode={info['saq']['saq_mode']}, "
          f"rho={info['saq']['rho']}, {training['global_steps']} steps in {training['train_runtime_s']:.0f} s")
    print(f"{info['data']['dataset_name']}, split {results['split']} ({results['num_examples']} images)")
    print(format_results(results, info["quantization"]["tag"]))
    if result.push_url:
        print(f"pushed: {result.push_url}")
    if result.push_error:
        print(f"saq-hf: {result.push_error}", file=sys.stderr)
        return 1
    return 0


def _train_command(ns: argparse.Namespace):
    """``saq-hf train`` as it was called, less any resume_from_checkpoint, as a function of the flags to add."""
    kept, skip = [], False
    for arg in ns.overrides:
        if skip:
            skip = False
        elif arg == "--resume_from_checkpoint":
            skip = True
        elif not arg.startswith("--resume_from_checkpoint="):
            kept.append(arg)
    return lambda *flags: shlex.join(["saq-hf", "train", ns.recipe, *kept, *flags])


def _add_train(commands) -> None:
    parser = commands.add_parser(
        "train", help="run a recipe: FP model -> quantize -> SAQ training -> hub-ready run folder",
        description="Any ModelArguments/DataArguments/QuantArguments/SAQTrainingArguments field overrides the "
                    "recipe: saq-hf train recipes/demo_mnist_vit_w4a4.yaml --max_steps 5 --output_dir /tmp/x. "
                    "saq-hf train RECIPE --help lists the fields with their types, defaults and the recipe's values. "
                    "--distill fp trains the quantized model against the run's own full-precision model (a model id "
                    "or folder names another teacher); saq_run.json and the model card record the teacher.",
    )
    parser.add_argument("recipe", help="YAML recipe whose keys are dataclass field names, or the name of a recipe "
                                       "shipped with saq-hf (e.g. demo_mnist_vit_w4a4)")
    parser.add_argument("overrides", nargs=argparse.REMAINDER, help="--field value pairs that override the recipe")
    parser.set_defaults(handler=_train)


def _uses_hub(model: str | None, dataset: str | None) -> bool:
    from .args import DEMO_DATASET
    from .hub import is_hub_id

    return is_hub_id(model) or (dataset not in (None, DEMO_DATASET, "imagefolder") and is_hub_id(dataset))


def _eval(ns: argparse.Namespace) -> int:
    import json

    from . import evaluate
    from .hub import RUN_INFO_NAME, work_offline_if_hub_unreachable

    try:
        info = json.loads((Path(ns.run_dir) / RUN_INFO_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        info = {}  # evaluate_run says what is wrong with the folder
    info = info if isinstance(info, dict) else {}
    data_info = info.get("data") if isinstance(info.get("data"), dict) else {}
    if ns.data_dir is None and _uses_hub(info.get("fp_model"), ns.dataset or data_info.get("dataset_name")):
        work_offline_if_hub_unreachable()

    results = evaluate.evaluate_run(ns.run_dir, dataset_name=ns.dataset, data_dir=ns.data_dir, split=ns.split,
                                    batch_size=ns.batch_size, max_eval_samples=ns.max_eval_samples,
                                    sharpness=ns.sharpness, sharpness_rho=ns.sharpness_rho,
                                    sharpness_batches=ns.sharpness_batches)
    print(f"{ns.run_dir}: {results['dataset']}, split {results['split']} ({results['num_examples']} images)")
    print(evaluate.format_results(results, results["tag"]))
    if "sharpness" in results:
        print(evaluate.format_sharpness(results["sharpness"],
                                        info.get("saq") if isinstance(info.get("saq"), dict) else None))
    return 0


def _add_eval(commands) -> None:
    parser = commands.add_parser("eval", help="top-1/top-5 of a run folder's quantized model and its FP model")
    parser.add_argument("run_dir", help="output_dir of a finished saq-hf run")
    parser.add_argument("--dataset", help="Hub dataset id, 'imagefolder' or 'demo_digits' (default: the run's)")
    parser.add_argument("--data_dir", help="imagefolder root (implies --dataset imagefolder)")
    parser.add_argument("--split", help="split to score (default: test when the dataset has it, else validation)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--max_eval_samples", type=int, help="score only the first N images")
    parser.add_argument("--sharpness", action="store_true",
                        help="also measure the quantized model's sharpness (top Hessian eigenvalue w.r.t. Q(w), "
                             "loss increase under random/adversarial perturbations) and add it to the model card")
    parser.add_argument("--sharpness_rho", type=float, default=0.05,
                        help="measuring radius: the L2 norm of one perturbation ε over all quantized weights Q(w), the "
                             "same for every run so that runs compare; not the training rho (default 0.05)")
    parser.add_argument("--sharpness_batches", type=int, default=4, help="batches used for sharpness (default 4)")
    parser.set_defaults(handler=_eval)


def _push(ns: argparse.Namespace) -> int:
    from .hub import PushError, push_run_folder, work_offline_if_hub_unreachable

    work_offline_if_hub_unreachable()  # offline: fail in seconds, not after ~30 s of retries
    try:
        url = push_run_folder(ns.run_dir, ns.hub_model_id, token=ns.hub_token, private=ns.private,
                              revision=ns.revision)
    except PushError as err:
        print(f"saq-hf: {err}", file=sys.stderr)
        return 1
    print(f"pushed {ns.run_dir} to {ns.hub_model_id}: {url}")
    return 0


def _add_push(commands) -> None:
    parser = commands.add_parser("push", help="upload a finished run folder (model, processor, card) to the Hub")
    parser.add_argument("run_dir", help="output_dir of a finished saq-hf run")
    parser.add_argument("--hub_model_id", required=True, help="repo id, e.g. your-name/vit-b16-pets-w4a4")
    parser.add_argument("--private", action="store_true", default=None, help="create the repo private")
    parser.add_argument("--revision", help="branch to push to (default: main)")
    parser.add_argument("--hub_token", help="token with write access (default: the logged-in one / HF_TOKEN)")
    parser.set_defaults(handler=_push)


def _export(ns: argparse.Namespace) -> int:
    from .export import export_command

    try:
        print(export_command(ns.run_dir, ns.out_dir, onnx=ns.onnx))
    except (ValueError, OSError, ImportError) as err:
        raise UserInputError(str(err).splitlines()[0]) from None
    except KeyboardInterrupt:
        print(f"saq-hf: interrupted; {ns.out_dir} may hold an incomplete export (saq-hf refuses to load one): rerun "
              "the same command to write it again", file=sys.stderr)
        return INTERRUPTED
    return 0


def _add_export(commands) -> None:
    parser = commands.add_parser("export", help="write packed integer weights + scales (and optionally ONNX)")
    parser.add_argument("run_dir", help="output_dir of a finished saq-hf run (or any saved saq-hf model)")
    parser.add_argument("out_dir", help="folder for config.json, weights.safetensors, export_manifest.json")
    parser.add_argument("--onnx", action="store_true", help="also write model.onnx (QuantizeLinear/DequantizeLinear)")
    parser.set_defaults(handler=_export)


def _search(ns: argparse.Namespace) -> int:
    from .evaluate import search_run
    from .search import format_plan

    if (ns.target_bits is None) == (ns.target_bytes is None):
        raise UserInputError("give one budget: --target_bits (average weight bits) or --target_bytes (weight bytes)")
    try:
        plan = search_run(ns.run_or_model, ns.out, target_bits=ns.target_bits, target_bytes=ns.target_bytes,
                          measure=ns.measure, candidates=ns.candidates, dataset_name=ns.dataset,
                          data_dir=ns.data_dir, batches=ns.batches, batch_size=ns.batch_size, rho=ns.rho,
                          weights_only=ns.weights_only, seed=ns.seed)
    except ValueError as err:  # UserInputError is not a ValueError: it reaches main() as it is
        raise UserInputError(str(err).splitlines()[0]) from None
    print(format_plan(plan))
    print(f"wrote {ns.out}: train with saq-hf train RECIPE --bits_plan {ns.out}")
    return 0


def _add_search(commands) -> None:
    parser = commands.add_parser(
        "search", help="choose a bit-width per layer under a size budget (mixed precision) and write a bits plan",
        description="Measures each layer's sensitivity at each candidate bit-width on a few training batches and "
                    "solves for the allocation with the least summed sensitivity that fits the budget; writes a YAML "
                    "plan that saq-hf train reads with --bits_plan. Example: saq-hf search outputs/demo_mnist_vit_w4a4 "
                    "--target_bits 3 --out plan.yaml",
    )
    parser.add_argument("run_or_model", help="a saq-hf run folder, or a saved (FP) model folder with --dataset")
    parser.add_argument("--target_bits", type=float, help="average weight bits of the searched layers (e.g. 3)")
    parser.add_argument("--target_bytes", type=int,
                        help="packed weight bytes of all quantized layers, as saq-hf export writes them")
    parser.add_argument("--measure", choices=["sharpness", "hessian"], default="sharpness",
                        help="sharpness: loss increase with the layer quantized and adversarially perturbed at the "
                             "radius --rho (default); hessian: Hutchinson Hessian trace x quantization error")
    parser.add_argument("--candidates", type=int, nargs="+", default=[2, 3, 4, 8], help="bit-widths to choose from")
    parser.add_argument("--out", default="bits_plan.yaml", help="plan file to write (default: bits_plan.yaml)")
    parser.add_argument("--dataset", help="dataset to measure on (default: the run's): Hub id, 'imagefolder' or "
                                          "'demo_digits'")
    parser.add_argument("--data_dir", help="imagefolder root (implies --dataset imagefolder)")
    parser.add_argument("--batches", type=int, default=2, help="training batches measured on (default 2)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--rho", type=float, default=0.002, help="relative radius of the sharpness measure (default 0.002)")
    parser.add_argument("--weights_only", action="store_true",
                        help="search weight bits only (inputs keep the recipe's a_bits); default: a_bits = w_bits")
    parser.add_argument("--seed", type=int, default=42)
    parser.set_defaults(handler=_search)


SUBCOMMANDS = (_add_train, _add_eval, _add_push, _add_export, _add_search)
INTERRUPTED = 130  # the shell's status for a command ended by Ctrl-C (128 + SIGINT)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="saq-hf", description="Sharpness-Aware Quantization for Hugging Face "
                                                                "vision models")
    commands = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    from .progress import quiet_transformers_bars

    try:
        with quiet_transformers_bars():
            return ns.handler(ns)
    except UserInputError as err:
        print(f"saq-hf: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # where no handler says more (train and export do)
        print(f"saq-hf: interrupted ({ns.command})", file=sys.stderr)
        return INTERRUPTED
    except BrokenPipeError:  # `saq-hf train RECIPE --help | head`: the reader left; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
