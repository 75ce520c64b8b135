"""The training loop: AdamW, cosine or one-cycle schedule, label smoothing, early stopping.

Read top-down: :class:`TrainConfig` holds every knob; :func:`train` runs the loop and returns
the path of the best checkpoint, which carries its config, labels and input spec so export and
publish need nothing else. Under ``torchrun`` (WORLD_SIZE > 1) the model is wrapped in
DistributedDataParallel with a DistributedSampler (NCCL on CUDA, gloo on CPU); every rank
evaluates the full validation set so early-stopping decisions agree without communication, and
only rank 0 writes checkpoints and logs.
"""

from __future__ import annotations

import logging
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from training.data import DataSplits, load_dataset
from training.digits import DEFAULT_SPLIT_FRACTIONS, DEFAULT_SPLIT_SEED
from training.errors import ConfigError, TrainingError
from training.models import ARCHITECTURES, build_model

logger = logging.getLogger(__name__)

SCHEDULES = ("cosine", "onecycle")


@dataclass
class TrainConfig:
    """Every training knob; saved inside each checkpoint."""

    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = False
    arch: str = "simplecnn"
    epochs: int = 30
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    schedule: str = "onecycle"
    label_smoothing: float = 0.05
    patience: int = 6
    val_fraction: float = DEFAULT_SPLIT_FRACTIONS[0]
    test_fraction: float = DEFAULT_SPLIT_FRACTIONS[1]
    image_size: int = 32
    seed: int = DEFAULT_SPLIT_SEED  # the split's, and the training's
    deterministic: bool = False
    amp: bool = True
    workers: int = 0
    device: str = "auto"
    out_dir: str = "checkpoints"
    resume: str | None = None
    tensorboard: str | None = None
    progress: bool = True

    def validate(self) -> None:
        if self.arch not in ARCHITECTURES:
            known = ", ".join(sorted(ARCHITECTURES))
            raise ConfigError(f"unknown arch {self.arch!r} (choose one of: {known})")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {self.schedule!r} (choose one of: {SCHEDULES})")
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("--epochs and --batch-size must be at least 1")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError("--label-smoothing must be in [0, 1)")


@dataclass
class TrainResult:
    best_checkpoint: Path
    test_accuracy: float
    best_val_loss: float
    epochs_run: int


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def resolve_device(name: str, dist_info: Distributed) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda requested but no CUDA device is available")
        return torch.device("cuda", dist_info.local_rank)
    if name != "cpu":
        raise ConfigError(f"unknown device {name!r} (auto, cpu or cuda)")
    return torch.device("cpu")


def init_distributed() -> Distributed:
    """Join the process group torchrun describes in the environment (a no-op without it)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    info = Distributed(
        rank=int(os.environ["RANK"]),
        world_size=world_size,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
    return info


def evaluate(
    model: nn.Module, dataset: Dataset[Any], device: torch.device, batch_size: int = 256
) -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy over ``dataset``."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    with torch.inference_mode():
        for inputs, targets in loader:
            inputs, targets = inputs.to(device), targets.to(device)
            logits = model(inputs).float()
            total_loss += nn.functional.cross_entropy(logits, targets, reduction="sum").item()
            correct += int((logits.argmax(dim=1) == targets).sum().item())
            count += targets.numel()
    if count == 0:
        raise TrainingError("evaluation set is empty")
    return total_loss / count, correct / count


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write beside, then rename: a crash never leaves a half-written checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise TrainingError(f"checkpoint {path} does not exist")
    try:
        payload: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many types for a bad file
        raise TrainingError(f"checkpoint {path} is unreadable: {exc}") from None
    for key in ("config", "model_state", "labels", "input_spec"):
        if key not in payload:
            raise TrainingError(f"checkpoint {path} lacks {key!r}: not written by this trainer")
    return payload


def model_from_checkpoint(payload: dict[str, Any]) -> nn.Module:
    model = build_model(payload["config"]["arch"], len(payload["labels"]))
    model.load_state_dict(payload["model_state"])
    return model.eval()


def _make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total)
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)


def train(cfg: TrainConfig, splits: DataSplits | None = None) -> TrainResult:
    """Train ``cfg.arch`` on ``cfg.dataset``; return the best checkpoint and its test accuracy."""
    cfg.validate()
    dist_info = init_distributed()
    seed_everything(cfg.seed, cfg.deterministic)
    device = resolve_device(cfg.device, dist_info)
    use_amp = cfg.amp and device.type == "cuda"
    if device.type == "cuda" and not cfg.deterministic:
        torch.backends.cudnn.benchmark = True

    if splits is None:
        splits = load_dataset(
            cfg.dataset,
            Path(cfg.data_dir) if cfg.data_dir else None,
            download=cfg.download,
            image_size=cfg.image_size,
            val_fraction=cfg.val_fraction,
            test_fraction=cfg.test_fraction,
            seed=cfg.seed,
        )
    model: nn.Module = build_model(cfg.arch, len(splits.labels)).to(device)
    sampler: DistributedSampler[Any] | None = (
        DistributedSampler(splits.train, seed=cfg.seed, shuffle=True) if dist_info.enabled else None
    )
    generator = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(
        splits.train,
        batch_size=cfg.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        generator=generator,
        num_workers=cfg.workers,
        pin_memory=device.type == "cuda",
        drop_last=False,
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = _make_scheduler(optimizer, cfg, max(1, len(loader)))
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    out_dir = Path(cfg.out_dir)
    best_path, last_path = out_dir / "best.pt", out_dir / "last.pt"
    start_epoch, best_val_loss, stale_epochs = 0, math.inf, 0
    if cfg.resume:
        state = load_checkpoint(Path(cfg.resume))
        saved = state["config"]
        if (saved["epochs"], saved["batch_size"], saved["schedule"]) != (
            cfg.epochs,
            cfg.batch_size,
            cfg.schedule,
        ):
            raise ConfigError(
                "--resume needs the --epochs, --batch-size and --schedule of the run it continues "
                f"({saved['epochs']}, {saved['batch_size']}, {saved['schedule']})"
            )
        model.load_state_dict(state["model_state"])
        optimizer.load_state_dict(state["optimizer_state"])
        scheduler.load_state_dict(state["scheduler_state"])
        start_epoch = int(state["epoch"]) + 1
        best_val_loss = float(state["best_val_loss"])
        stale_epochs = int(state.get("stale_epochs", 0))
        logger.info("resumed from %s at epoch %d", cfg.resume, start_epoch + 1)

    if dist_info.enabled:
        model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    bare_model: nn.Module = model.module if isinstance(model, DistributedDataParallel) else model

    writer = None
    if cfg.tensorboard and dist_info.is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(cfg.tensorboard)

    def payload(epoch: int) -> dict[str, Any]:
        return {
            "config": asdict(cfg),
            "model_state": bare_model.state_dict(),
            "optimizer_state": optimizer.state_dict(),
            "scheduler_state": scheduler.state_dict(),
            "epoch": epoch,
            "best_val_loss": best_val_loss,
            "stale_epochs": stale_epochs,
            "labels": splits.labels,
            "input_spec": splits.input_spec.to_dict(),
            "dataset": splits.describe(),
            "torch_version": torch.__version__,
            "world_size": dist_info.world_size,
        }

    epoch = start_epoch - 1
    for epoch in range(start_epoch, cfg.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        model.train()
        started, seen, running_loss = time.perf_counter(), 0, 0.0
        bar = tqdm(
            loader,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            leave=False,
            disable=not (cfg.progress and dist_info.is_main and sys.stderr.isatty()),
        )
        for inputs, targets in bar:
            inputs = inputs.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                loss = criterion(model(inputs), targets)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            seen += targets.numel()
            running_loss += loss.item() * targets.numel()
            bar.set_postfix(loss=f"{loss.item():.4f}")
        elapsed = time.perf_counter() - started
        val_loss, val_acc = evaluate(bare_model, splits.val, device)
        improved = val_loss < best_val_loss - 1e-6
        if improved:
            best_val_loss, stale_epochs = val_loss, 0
        else:
            stale_epochs += 1
        if dist_info.is_main:
            throughput = seen * dist_info.world_size / max(elapsed, 1e-9)
            logger.info(
                "epoch %d/%d train_loss %.4f val_loss %.4f val_acc %.4f %.0f img/s%s",
                epoch + 1,
                cfg.epochs,
                running_loss / max(seen, 1),
                val_loss,
                val_acc,
                throughput,
                " *best*" if improved else "",
            )
            if writer is not None:
                writer.add_scalar("loss/train", running_loss / max(seen, 1), epoch)
                writer.add_scalar("loss/val", val_loss, epoch)
                writer.add_scalar("accuracy/val", val_acc, epoch)
                writer.add_scalar("throughput/images_per_s", throughput, epoch)
            if improved:
                save_checkpoint(best_path, payload(epoch))
            save_checkpoint(last_path, payload(epoch))
        if stale_epochs >= cfg.patience:
            if dist_info.is_main:
                logger.info("early stop: val loss has not improved for %d epochs", cfg.patience)
            break

    if writer is not None:
        writer.close()
    if dist_info.enabled:
        dist.barrier()
    if not best_path.is_file():
        raise TrainingError(f"no best checkpoint was written to {best_path}")
    best = load_checkpoint(best_path)
    test_loss, test_acc = evaluate(model_from_checkpoint(best).to(device), splits.test, device)
    if dist_info.is_main:
        best["metrics"] = {
            "test_accuracy": test_acc,
            "test_loss": test_loss,
            "best_val_loss": float(best["best_val_loss"]),
        }
        save_checkpoint(best_path, best)
        logger.info("test accuracy %.4f (loss %.4f) -> %s", test_acc, test_loss, best_path)
    if dist_info.enabled:
        dist.barrier()
        dist.destroy_process_group()
    return TrainResult(best_path, test_acc, float(best["best_val_loss"]), epoch + 1)
