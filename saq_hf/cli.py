"""``saq-hf``: train a recipe, evaluate a run folder, push it to the Hub, export integer weights.

A thin shell over :mod:`saq_hf.run` and :mod:`saq_hf.hub`. Each subcommand is a ``_add_<name>`` function that
declares its arguments and a handler returning the exit status; bad input (a :class:`UserInputError`) becomes
one line on stderr and exit status 2.
"""

import argparse
import sys

from .args import UserInputError


def _train(ns: argparse.Namespace) -> int:
    from . import run
    from .args import DataArguments, ModelArguments, QuantArguments, parse_recipe
    from .trainer import SAQTrainingArguments

    recipe_args = parse_recipe(ns.recipe, ns.overrides,
                               (ModelArguments, DataArguments, QuantArguments, SAQTrainingArguments))
    result = run.train(run.prepare(*recipe_args))
    info = result.run_info
    results, training = info["results"], info["training"]
    print(f"\nsaq-hf run {result.output_dir}: {info['quantization']['tag']}, saq_mode={info['saq']['saq_mode']}, "
          f"rho={info['saq']['rho']}, {training['global_steps']} steps in {training['train_runtime_s']:.0f} s")
    print(f"{info['data']['dataset_name']}, split {results['split']} ({results['num_examples']} images)")
    print(run.format_results(results, info["quantization"]["tag"]))
    if result.push_url:
        print(f"pushed: {result.push_url}")
    if result.push_error:
        print(f"saq-hf: {result.push_error}", file=sys.stderr)
        return 1
    return 0


def _add_train(commands) -> None:
    parser = commands.add_parser(
        "train", help="run a recipe: FP model -> quantize -> SAQ training -> hub-ready run folder",
        description="Any ModelArguments/DataArguments/QuantArguments/SAQTrainingArguments field overrides the "
                    "recipe: saq-hf train recipes/demo_mnist_vit_w4a4.yaml --max_steps 5 --output_dir /tmp/x",
    )
    parser.add_argument("recipe", help="YAML recipe whose keys are dataclass field names")
    parser.add_argument("overrides", nargs=argparse.REMAINDER, help="--field value pairs that override the recipe")
    parser.set_defaults(handler=_train)


def _eval(ns: argparse.Namespace) -> int:
    from . import run

    results = run.evaluate_run(ns.run_dir, dataset_name=ns.dataset, data_dir=ns.data_dir, split=ns.split,
                               batch_size=ns.batch_size, max_eval_samples=ns.max_eval_samples,
                               sharpness=ns.sharpness, sharpness_rho=ns.sharpness_rho,
                               sharpness_batches=ns.sharpness_batches)
    print(f"{ns.run_dir}: {results['dataset']}, split {results['split']} ({results['num_examples']} images)")
    print(run.format_results(results, results["tag"]))
    if "sharpness" in results:
        print(run.format_sharpness(results["sharpness"]))
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
    parser.add_argument("--sharpness_rho", type=float, default=0.05, help="perturbation radius (default 0.05)")
    parser.add_argument("--sharpness_batches", type=int, default=4, help="batches used for sharpness (default 4)")
    parser.set_defaults(handler=_eval)


def _push(ns: argparse.Namespace) -> int:
    from .hub import PushError, push_run_folder

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
    except (ValueError, FileNotFoundError, OSError) as err:
        raise UserInputError(str(err).splitlines()[0]) from None
    return 0


def _add_export(commands) -> None:
    parser = commands.add_parser("export", help="write packed integer weights + scales (and optionally ONNX)")
    parser.add_argument("run_dir", help="output_dir of a finished saq-hf run (or any saved saq-hf model)")
    parser.add_argument("out_dir", help="folder for config.json, weights.safetensors, export_manifest.json")
    parser.add_argument("--onnx", action="store_true", help="also write model.onnx (QuantizeLinear/DequantizeLinear)")
    parser.set_defaults(handler=_export)


SUBCOMMANDS = (_add_train, _add_eval, _add_push, _add_export)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="saq-hf", description="Sharpness-Aware Quantization for Hugging Face "
                                                                "vision models")
    commands = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        return ns.handler(ns)
    except UserInputError as err:
        print(f"saq-hf: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
