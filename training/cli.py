"""Train, export and publish image classifiers.

Usage::

    python -m training train-and-publish                 # digits + simplecnn -> model_repository/
    python -m training train --dataset cifar10 --data-dir data --arch resnet8 --epochs 40
    python -m training export --checkpoint checkpoints/best.pt --out exported/
    python -m training publish --checkpoint checkpoints/best.pt --repo model_repository --keep 5
    python -m training publish --max-batch-size 16 --preferred-batch-sizes 4 8 --instance-count 2
    python -m training publish --int8                    # + an int8 model, if it passes its gate
    torchrun --nproc-per-node 2 -m training train        # DistributedDataParallel

The serving flags (--max-batch-size, ...) become the version's serving block in its manifest:
how the predictor, TorchServe and Triton batch and limit requests for that version.

Errors a user can fix (unknown dataset or arch, missing or empty folder, failed parity, a
serving value out of range) print one line to stderr and exit with status 2; nothing is
published after a failure.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from services.common.serving import ServingConfig
from training.data import DATASETS
from training.errors import ConfigError, TrainingError
from training.models import ARCHITECTURES
from training.trainer import SCHEDULES, TrainConfig

if TYPE_CHECKING:
    from training.quantize import GateOptions

EXIT_USER_ERROR = 2


def _add_train_flags(parser: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    g = parser.add_argument_group("data")
    g.add_argument(
        "--dataset", default=d.dataset, help=f"one of {', '.join(DATASETS)} (default %(default)s)"
    )
    g.add_argument(
        "--data-dir",
        default=d.data_dir,
        help="cifar10: folder holding cifar-10-batches-py; imagefolder: folder of class subfolders",
    )
    g.add_argument(
        "--download",
        action="store_true",
        help="cifar10 only: download into --data-dir (needs internet)",
    )
    g.add_argument(
        "--image-size",
        type=int,
        default=d.image_size,
        help="model input height and width (default %(default)s)",
    )
    g.add_argument(
        "--val-fraction",
        type=float,
        default=d.val_fraction,
        help="share held out for validation (default %(default)s)",
    )
    g.add_argument(
        "--test-fraction",
        type=float,
        default=d.test_fraction,
        help="share held out for testing (default %(default)s; cifar10 uses its test set)",
    )
    g = parser.add_argument_group("model and optimisation")
    g.add_argument(
        "--arch",
        default=d.arch,
        help=f"one of {', '.join(sorted(ARCHITECTURES))} (default %(default)s)",
    )
    g.add_argument(
        "--epochs", type=int, default=d.epochs, help="maximum epochs (default %(default)s)"
    )
    g.add_argument(
        "--batch-size",
        type=int,
        default=d.batch_size,
        help="per-process batch size (default %(default)s)",
    )
    g.add_argument(
        "--lr", type=float, default=d.lr, help="peak AdamW learning rate (default %(default)s)"
    )
    g.add_argument(
        "--weight-decay",
        type=float,
        default=d.weight_decay,
        help="AdamW weight decay (default %(default)s)",
    )
    g.add_argument(
        "--schedule",
        default=d.schedule,
        help=f"learning-rate schedule: {', '.join(SCHEDULES)} (default %(default)s)",
    )
    g.add_argument(
        "--label-smoothing",
        type=float,
        default=d.label_smoothing,
        help="cross-entropy label smoothing (default %(default)s)",
    )
    g.add_argument(
        "--patience",
        type=int,
        default=d.patience,
        help="early stop after this many epochs without a better val loss (default %(default)s)",
    )
    g = parser.add_argument_group("run")
    g.add_argument(
        "--seed",
        type=int,
        default=d.seed,
        help="seed for the split, init and shuffling (default %(default)s)",
    )
    g.add_argument(
        "--deterministic", action="store_true", help="deterministic algorithms (slower on CUDA)"
    )
    g.add_argument(
        "--no-amp", dest="amp", action="store_false", help="disable mixed precision on CUDA"
    )
    g.add_argument(
        "--workers",
        type=int,
        default=d.workers,
        help="DataLoader worker processes (default %(default)s)",
    )
    g.add_argument("--device", default=d.device, help="auto, cpu or cuda (default %(default)s)")
    g.add_argument(
        "--out-dir",
        default=d.out_dir,
        help="checkpoint folder: best.pt and last.pt (default %(default)s)",
    )
    g.add_argument(
        "--resume", default=None, help="continue from a checkpoint (e.g. checkpoints/last.pt)"
    )
    g.add_argument("--tensorboard", default=None, help="write TensorBoard logs to this folder")
    g.add_argument(
        "--no-progress", dest="progress", action="store_false", help="hide the progress bar"
    )


def _add_publish_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--repo", default="model_repository", help="model repository root (default %(default)s)"
    )
    parser.add_argument(
        "--model-name",
        default="classifier",
        help="model name in the repository (default %(default)s)",
    )
    parser.add_argument(
        "--keep",
        type=int,
        default=None,
        help="after publishing, delete all but the newest N versions (N >= 1)",
    )
    _add_serving_flags(parser)
    _add_int8_flags(parser)


def _add_int8_flags(parser: argparse.ArgumentParser) -> None:
    """``--int8`` and its gate (README "int8")."""
    # The defaults live in training.quantize, which imports torch: repeated here for --help,
    # checked equal by the tests.
    g = parser.add_argument_group(
        "int8", "also publish an int8 ONNX model, only if it passes the accuracy gate"
    )
    g.add_argument(
        "--int8",
        action="store_true",
        help="quantize the ONNX model to int8 (static, calibrated on training images)",
    )
    g.add_argument(
        "--int8-margin",
        type=float,
        default=0.5,
        metavar="POINTS",
        help="most the int8 test accuracy may fall below fp32's, in points (default %(default)s)",
    )
    g.add_argument(
        "--int8-min-agreement",
        type=float,
        default=0.99,
        metavar="FRACTION",
        help="least share of held-out images where int8's top-1 equals fp32's "
        "(default %(default)s)",
    )


def _add_serving_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per ServingConfig field, its default the field's (README "Serving config")."""
    d = ServingConfig()
    g = parser.add_argument_group(
        "serving config", "written into the version's manifest; every engine batches by it"
    )
    g.add_argument(
        "--max-batch-size",
        type=int,
        default=d.max_batch_size,
        help="most images in one inference call; 1 turns batching off (default %(default)s)",
    )
    g.add_argument(
        "--max-batch-delay-ms",
        type=float,
        default=d.max_batch_delay_ms,
        help="how long the oldest queued image may wait for a batch to fill "
        "(default %(default)s; TorchServe rounds it up to whole ms)",
    )
    g.add_argument(
        "--preferred-batch-sizes",
        type=int,
        nargs="*",
        default=list(d.preferred_batch_sizes),
        metavar="N",
        help="batch sizes Triton's dynamic batcher aims for, each at most --max-batch-size "
        "(default: none, the largest batch it can form)",
    )
    g.add_argument(
        "--max-images-per-request",
        type=int,
        default=d.max_images_per_request,
        help="most images in one request (default %(default)s)",
    )
    g.add_argument(
        "--max-pixels",
        type=int,
        default=d.max_pixels,
        help="largest image (width x height) an engine decodes (default %(default)s)",
    )
    g.add_argument(
        "--instance-count",
        type=int,
        default=d.instance_count,
        help="model instances per engine: Triton instances, TorchServe workers, predictor "
        "inference threads (default %(default)s)",
    )


def serving_config(args: argparse.Namespace) -> ServingConfig:
    """The serving block the flags describe; a value that cannot work is a ConfigError."""
    values = {name: getattr(args, name) for name in ServingConfig.model_fields}
    try:
        return ServingConfig.model_validate(values)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            message = str(error["msg"]).removeprefix("Value error, ")
            field = ".".join(str(part) for part in error["loc"][:1])
            problems.append(f"--{field.replace('_', '-')}: {message}" if field else message)
        raise ConfigError("invalid serving config: " + "; ".join(problems)) from None


def _int8_gate(args: argparse.Namespace) -> GateOptions | None:
    """The int8 gate the flags ask for; None without ``--int8``."""
    if not args.int8:
        return None
    from training.quantize import GateOptions

    return GateOptions(margin_pp=args.int8_margin, min_agreement=args.int8_min_agreement)


def _check_publish_args(args: argparse.Namespace) -> ServingConfig:
    if args.keep is not None and args.keep < 1:
        raise ConfigError(f"--keep must be at least 1, got {args.keep}")
    return serving_config(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = commands.add_parser("train", help="train a model and write checkpoints")
    _add_train_flags(train)
    export = commands.add_parser(
        "export", help="export a checkpoint to TorchScript and ONNX and check parity"
    )
    export.add_argument(
        "--checkpoint",
        default="checkpoints/best.pt",
        help="checkpoint to export (default %(default)s)",
    )
    export.add_argument(
        "--out", default="exported", help="folder for model.pt and model.onnx (default %(default)s)"
    )
    publish = commands.add_parser(
        "publish", help="export, check and publish a checkpoint as a new version"
    )
    publish.add_argument(
        "--checkpoint",
        default="checkpoints/best.pt",
        help="checkpoint to publish (default %(default)s)",
    )
    _add_publish_flags(publish)
    both = commands.add_parser("train-and-publish", help="train, then publish the best checkpoint")
    _add_train_flags(both)
    _add_publish_flags(both)
    return parser


def _train_config(args: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names})


def run(args: argparse.Namespace) -> int:
    # Imported here so `--help` and argument errors answer at once, without loading torch.
    from training.publish import publish_checkpoint
    from training.trainer import train

    # Checked before any training: a typo in a serving flag costs no minutes.
    publishing = args.command in ("publish", "train-and-publish")
    serving = _check_publish_args(args) if publishing else None
    int8 = _int8_gate(args) if publishing else None
    if args.command == "train":
        result = train(_train_config(args))
        if int(os.environ.get("RANK", "0")) == 0:
            print(
                f"best checkpoint {result.best_checkpoint} test accuracy {result.test_accuracy:.4f}"
            )
    elif args.command == "export":
        _export(Path(args.checkpoint), Path(args.out))
    elif args.command == "publish":
        version = publish_checkpoint(
            Path(args.checkpoint),
            Path(args.repo),
            args.model_name,
            keep=args.keep,
            serving=serving,
            int8=int8,
        )
        print(f"published {args.model_name} version {version} to {args.repo}")
    else:
        started = time.perf_counter()
        config = _train_config(args)
        result = train(config)
        if int(os.environ.get("RANK", "0")) != 0:
            return 0
        version = publish_checkpoint(
            result.best_checkpoint,
            Path(args.repo),
            args.model_name,
            keep=args.keep,
            serving=serving,
            int8=int8,
        )
        print(
            f"published {args.model_name} version {version} to {args.repo}: "
            f"test accuracy {result.test_accuracy:.4f}, train-and-publish took "
            f"{time.perf_counter() - started:.1f}s"
        )
    return 0


def _export(checkpoint_path: Path, out: Path) -> None:
    from training.export import export_and_check
    from training.publish import held_out_batch
    from training.trainer import load_checkpoint, model_from_checkpoint

    checkpoint = load_checkpoint(checkpoint_path)
    ts_path, onnx_path, report = export_and_check(
        model_from_checkpoint(checkpoint), held_out_batch(checkpoint), out
    )
    print(f"wrote {ts_path} and {onnx_path}: {report.as_dict()}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for chatty in ("onnxscript", "onnx_ir", "torch.onnx"):  # the ONNX exporter's pass-by-pass log
        logging.getLogger(chatty).setLevel(logging.WARNING)
    try:
        return run(args)
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
