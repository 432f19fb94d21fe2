"""The distill stage: short recovery of a pruned model from its dense teacher, masks frozen.

Student = the artifact's sparse weights; teacher = its dense twin (`dense.safetensors`, same channel
order) or any model source. Loss (method section 8):

    a * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - a) * CE(labels, label smoothing)

Masks never change: gradients of pruned weights are zeroed before every optimizer step and the masks
are re-applied after it; at the end every masked layer must still be exactly its N:M pattern with the
zero set equal to the mask, or no artifact is written. Runs single-process or under `torchrun`
(DistributedDataParallel; gloo on CPU, nccl on CUDA). Each epoch is checkpointed beside the output
folder (`.distill-ckpt-<name>/`) so an interrupted run resumes from its last finished epoch.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mpdeploy import artifacts
from mpdeploy.errors import MpdeployError
from mpdeploy.patterns import NM, is_nm_compliant
from mpdeploy.weights import apply_masks, load_pruned

logger = logging.getLogger(__name__)

# progress(step, done, total, **metrics): metrics carry epoch, loss (running mean) and images_per_s.
Progress = Callable[..., None]

OPTIMIZERS = ("adamw", "sgd")
# The paper's settings (ImageNet-1k, 3 epochs, batch 256): ViT AdamW 1e-5, ResNet SGD 1e-3.
PAPER_LR = {"adamw": 1e-5, "sgd": 1e-3}
PAPER_STEPS = 3 * math.ceil(1_281_167 / 256)  # optimizer steps of that schedule (15,015)
# A short run on a small set takes far fewer steps than the paper's, so the default lr is scaled up by
# the step ratio, capped: chosen on the digits zoo models (see docs/distill.md), not validated elsewhere.
MAX_LR_SCALE = 100.0
WEIGHT_DECAY = {"adamw": 0.05, "sgd": 1e-4}
SGD_MOMENTUM = 0.9
KIND = "distilled"  # its own artifact kind; its source ("pruned") is the artifact it recovered
DEFAULT_OUT = "distilled"  # beside the input: engines/<name>/pruned -> engines/<name>/distilled
# Fields that change how, not what, a run computes: left out of the reuse key.
RUN_ONLY_FIELDS = ("resume", "device")
DUMP_ENV = "MPDEPLOY_TEST_DUMP_DIR"  # tests: each rank writes the hash of its final weights here


@dataclass(frozen=True)
class DistillConfig:
    data: str = "digits"  # "digits" | ImageFolder dir | "synthetic" (smoke runs only)
    epochs: int = 3
    batch_size: int | None = None  # global batch; None -> 64 on CPU, 256 on GPU
    lr: float | None = None  # None -> paper lr scaled by step count (see default_lr)
    optimizer: str | None = None  # "adamw" | "sgd"; None -> adamw for ViTs, else sgd
    alpha: float = 0.5
    temperature: float = 2.0
    label_smoothing: float = 0.1
    amp: bool | None = None  # None -> on for CUDA, off for CPU
    seed: int = 0
    teacher: str | None = None  # None -> the artifact's dense.safetensors; else a model source
    resume: bool = True
    device: str | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise MpdeployError(f"--epochs must be at least 1, got {self.epochs}")
        if self.batch_size is not None and self.batch_size < 1:
            raise MpdeployError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.lr is not None and not self.lr > 0:
            raise MpdeployError(f"--lr must be positive, got {self.lr}")
        if self.optimizer is not None and self.optimizer not in OPTIMIZERS:
            raise MpdeployError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if not 0.0 <= self.alpha <= 1.0:
            raise MpdeployError(f"--alpha weighs KD against CE and must be in [0, 1], got {self.alpha}")
        if not self.temperature > 0:
            raise MpdeployError(f"--temperature must be positive, got {self.temperature}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise MpdeployError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
            alpha: float = 0.5, temperature: float = 2.0, label_smoothing: float = 0.1) -> torch.Tensor:
    """a*T^2*KL(p_t || p_s) at temperature T (batch mean) + (1-a)*CE(labels, smoothing)."""
    t = temperature
    # float32 so the softmax stays accurate under autocast.
    s, z = student_logits.float(), teacher_logits.float()
    kl = F.kl_div(F.log_softmax(s / t, dim=-1), F.log_softmax(z / t, dim=-1), reduction="batchmean", log_target=True)
    ce = F.cross_entropy(s, labels, label_smoothing=label_smoothing)
    return alpha * t * t * kl + (1.0 - alpha) * ce


def is_vit(model: nn.Module) -> bool:
    return hasattr(model, "blocks") or hasattr(model, "patch_embed")


def default_lr(optimizer: str, total_steps: int) -> tuple[float, str]:
    """(lr, how it was chosen): the paper's lr times min(MAX_LR_SCALE, PAPER_STEPS / total_steps).

    Why up to 100x the paper's lr: the paper's 3 epochs are ~15k steps; a short run (digits: 60 steps)
    with the paper's lr barely moves. Measured (benchmarks/results/distill_digits.md, 3 epochs, top-1 on
    the digits test split): ViT x1 94.25, x10 96.47, x30 96.66, x100 (this rule) 96.66, x300 94.62;
    CNN x1 99.26, x10 99.44, x30 99.44, x100 99.44, x300 98.33. The cap sits at the top of the plateau,
    below where x300 starts to hurt. Long runs (>= PAPER_STEPS steps) get the paper's lr unchanged."""
    scale = min(MAX_LR_SCALE, max(1.0, PAPER_STEPS / max(1, total_steps)))
    rule = f"paper {PAPER_LR[optimizer]:g} x {scale:.3g} (paper steps {PAPER_STEPS} / {total_steps} steps, cap {MAX_LR_SCALE:g})"
    return PAPER_LR[optimizer] * scale, rule


@dataclass(frozen=True)
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    created: bool = False  # we initialized the process group, so we tear it down

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def _init_distributed(device: torch.device) -> _Dist:
    """Join the process group torchrun describes in the environment (only if WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    import torch.distributed as dist

    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    created = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        created = True
    return _Dist(rank, world, local_rank, created)


def _device(config: DistillConfig) -> torch.device:
    name = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MpdeployError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MpdeployError("--device cuda but no CUDA GPU is visible; drop --device or pass --device cpu")
    if device.type == "cuda" and device.index is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def _amp_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    if not amp:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16  # CPU autocast only does bf16


def _load_teacher(config: DistillConfig, pruned_dir: Path, manifest: dict[str, Any]) -> tuple[nn.Module, dict]:
    if config.teacher is None:
        dense = load_pruned(pruned_dir, which="dense", verify=False).model
        record = {"kind": "artifact", "file": "dense.safetensors",
                  "sha256": manifest.get("files", {}).get("dense.safetensors"), "model": manifest["model"]["source"]}
        return dense, record
    from mpdeploy.models import ModelSpec, load_model

    loaded = load_model(ModelSpec(source=config.teacher, input_shape=tuple(manifest["model"]["input_shape"])))
    return loaded.module, {"kind": "model", "spec": config.teacher, "source": loaded.source}


def _train_data(config: DistillConfig, manifest: dict[str, Any], num_outputs: int):
    from mpdeploy.data import load_images

    shape = tuple(manifest["model"]["input_shape"])
    data = load_images(config.data, shape, split="train", data_config=manifest["model"].get("data_config") or {},
                       seed=config.seed)
    if len(data) == 0:
        raise MpdeployError(f"training data {config.data!r} holds no images; pass --data DIR|digits")
    if data.synthetic:
        logger.warning("distilling on synthetic noise with constant labels: a smoke run, not a recovery")
    elif data.num_classes != num_outputs:
        raise MpdeployError(
            f"{data.description} has {data.num_classes} classes but the model has {num_outputs} outputs; "
            "pass --data DIR, an ImageFolder of the model's own training classes"
        )
    test = load_images("digits", shape, split="test") if config.data == "digits" else None
    return data, test


@torch.no_grad()
def evaluate(model: nn.Module, data, device: torch.device, batch_size: int = 256) -> float:
    """Top-1 accuracy (%) of `model` on `data` (an ImageData), in eval mode."""
    from mpdeploy.data import loader

    was_training = model.training
    model.eval()
    correct = total = 0
    for x, y in loader(data, batch_size):
        pred = model(x.to(device)).argmax(-1).cpu()
        correct += int((pred == y).sum())
        total += len(y)
    model.train(was_training)
    return 100.0 * correct / max(1, total)


def _zero_masked_grads(masked: list[tuple[nn.Parameter, torch.Tensor]]) -> None:
    for param, keep in masked:
        if param.grad is not None:
            param.grad.mul_(keep)


def verify_masks(model: nn.Module, masks: dict[str, torch.Tensor], patterns: dict[str, NM],
                 zero_before: dict[str, torch.Tensor] | None = None) -> None:
    """Raise unless every masked weight is exactly its pattern and its zero set is the mask's complement.

    Kept weights that were already exactly zero before distillation (`zero_before`) may stay zero.
    """
    params = dict(model.named_parameters())
    bad = []
    for name, mask in masks.items():
        w = params[name].detach().cpu()
        pattern = patterns.get(name)
        mask = mask.cpu()
        zero = w == 0
        expected = ~mask
        if zero_before and name in zero_before:
            zero = zero & ~(mask & zero_before[name].cpu())
        if (pattern is not None and not is_nm_compliant(w, pattern)) or not torch.equal(zero, expected):
            drift = int((w[~mask] != 0).sum())
            bad.append(f"{name} ({drift} pruned weights became nonzero, pattern {pattern})")
    if bad:
        raise RuntimeError(f"internal error: masks changed during distillation: {'; '.join(bad[:5])}")


def _state_hash(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _checkpoint_dir(target: Path) -> Path:
    return target.parent / f".distill-ckpt-{target.name}"


def _save_checkpoint(ckpt: Path, key: str, student: nn.Module, optimizer, scheduler, scaler, epochs_done: int,
                     records: list[dict[str, Any]]) -> None:
    state = {
        "model": student.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "epochs_done": epochs_done,
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    with artifacts.atomic_dir(ckpt, replace_any=True) as tmp:
        torch.save(state, tmp / "state.pt")
        artifacts.write_json(tmp / "meta.json", {"key": key, "epochs_done": epochs_done, "epochs": records})


def _load_checkpoint(ckpt: Path, key: str) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
    meta_path = ckpt / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = artifacts.read_json(meta_path, "distill checkpoint")
        if meta.get("key") != key:
            logger.warning("ignoring checkpoint %s: made with another config or input; starting over", ckpt)
            return None
        state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged checkpoint costs the epochs it held, never the run
        logger.warning("ignoring unreadable checkpoint %s (%s); starting over", ckpt, exc)
        return None
    return state, list(meta.get("epochs", []))


def _resolve(config: DistillConfig, student: nn.Module, device: torch.device, n_train: int, world: int) -> dict:
    """Fill in the None defaults; the result is recorded in the manifest and keys the checkpoint."""
    optimizer = config.optimizer or ("adamw" if is_vit(student) else "sgd")
    batch = config.batch_size or (256 if device.type == "cuda" else 64)
    per_rank = batch // world
    if per_rank < 1:
        raise MpdeployError(f"--batch-size {batch} is smaller than the {world} processes; raise it to at least {world}")
    if per_rank * world != batch:
        logger.warning("global batch %d is not divisible by %d processes; using %d", batch, world, per_rank * world)
    steps_per_epoch = math.ceil(math.ceil(n_train / world) / per_rank)
    total_steps = steps_per_epoch * config.epochs
    if config.lr is not None:
        lr, rule = config.lr, "given"
    else:
        lr, rule = default_lr(optimizer, total_steps)
    amp = config.amp if config.amp is not None else device.type == "cuda"
    dtype = _amp_dtype(device, amp)
    return {
        "optimizer": optimizer, "lr": lr, "lr_rule": rule, "schedule": "cosine per step to 0",
        "weight_decay": WEIGHT_DECAY[optimizer], "momentum": SGD_MOMENTUM if optimizer == "sgd" else None,
        "batch_size": per_rank * world, "batch_per_process": per_rank, "world_size": world,
        "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
        "amp": amp, "amp_dtype": str(dtype).removeprefix("torch.") if dtype else None, "device": device.type,
    }


def _optimizer(student: nn.Module, settings: dict[str, Any]) -> torch.optim.Optimizer:
    # No decay on biases / norms / embeddings (1-D and the ViT tokens): standard for fine-tuning.
    decay = [p for p in student.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in student.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": settings["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    if settings["optimizer"] == "adamw":
        return torch.optim.AdamW(groups, lr=settings["lr"])
    return torch.optim.SGD(groups, lr=settings["lr"], momentum=SGD_MOMENTUM)


def reuse_config(config: DistillConfig) -> dict[str, Any]:
    """The config a distilled manifest records and its reuse key hashes (run-only fields left out)."""
    return {k: v for k, v in artifacts.to_jsonable(asdict(config)).items() if k not in RUN_ONLY_FIELDS}


def default_out(pruned_dir: Path) -> Path:
    return Path(pruned_dir).parent / DEFAULT_OUT


def distill(pruned_dir: Path, config: DistillConfig, out_dir: Path | None = None,
            progress: Progress | None = None) -> Path:
    """Distill the dense teacher into the pruned student; write a `distilled/` artifact (source: the input).

    The input is never rewritten: the default output is `distilled/` beside it. Under torchrun every
    rank calls this; rank 0 writes checkpoints and the artifact, and every rank returns the output path.
    """
    pruned_dir = Path(pruned_dir)
    target = Path(out_dir) if out_dir is not None else default_out(pruned_dir)
    src, dst = pruned_dir.resolve(), target.resolve()
    if src == dst or src in dst.parents or dst in src.parents:
        raise MpdeployError(f"--out {target} overlaps the input artifact {pruned_dir}; distillation writes a new "
                            "artifact and never rewrites its input: choose a sibling folder")
    art = load_pruned(pruned_dir, which="sparse")  # checks the file hashes and the chain too
    artifacts.check_replaceable(target, KIND)  # refuse a user's folder before hours of training
    manifest = art.manifest
    device = _device(config)
    dist = _init_distributed(device)
    try:
        return _distill(pruned_dir, target, art, manifest, config, device, dist, progress)
    finally:
        if dist.created:
            torch.distributed.destroy_process_group()


def _distill(pruned_dir, target, art, manifest, config, device, dist, progress) -> Path:
    torch.manual_seed(config.seed)
    step = progress or (lambda *a, **k: None)
    student = art.model.to(device)
    masks = {k: v.to(device) for k, v in art.masks.items()}
    patterns = art.patterns()
    params = dict(student.named_parameters())
    missing = sorted(set(masks) - set(params))
    if missing:
        raise MpdeployError(f"{pruned_dir}: masks for unknown parameters ({missing[0]}); re-run `mpdeploy prune`")
    masked = [(params[n], m.to(params[n].dtype)) for n, m in masks.items()]
    zero_before = {n: (params[n].detach() == 0) & m for n, m in masks.items()}

    teacher, teacher_record = _load_teacher(config, pruned_dir, manifest)
    teacher = teacher.to(device).eval().requires_grad_(False)
    with torch.no_grad():
        probe = torch.zeros(2, *art.input_shape, device=device)
        s_out, t_out = student.eval()(probe), teacher(probe)
    if s_out.shape != t_out.shape:
        raise MpdeployError(
            f"teacher {config.teacher!r} outputs {tuple(t_out.shape[1:])} but the student outputs "
            f"{tuple(s_out.shape[1:])}; pass a teacher with the same classes"
        )
    num_outputs = int(s_out.shape[-1])

    train, test = _train_data(config, manifest, num_outputs)
    settings = _resolve(config, student, device, len(train), dist.world)
    dtype = torch.float16 if settings["amp_dtype"] == "float16" else torch.bfloat16
    amp = bool(settings["amp"])
    config_record = {**asdict(config), "resolved": settings}
    key = artifacts.sha256_json({
        "config": reuse_config(config),
        "settings": {k: v for k, v in settings.items() if k != "device"},
        "input": artifacts.manifest_hash(pruned_dir),
    })

    before = {}
    if test is not None:
        before = {"student": evaluate(student, test, device), "teacher": evaluate(teacher, test, device)}

    optimizer = _optimizer(student, settings)
    total_steps = settings["total_steps"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, total_steps) / total_steps)))
    scaler = torch.amp.GradScaler(device.type, enabled=amp and dtype == torch.float16)

    ckpt = _checkpoint_dir(target)
    start, records = 0, []
    if config.resume:
        dist.barrier()  # every rank sees the same checkpoint folder
        loaded = _load_checkpoint(ckpt, key)
        if loaded is not None:
            state, records = loaded
            student.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            torch.set_rng_state(state["rng_cpu"])
            if state["rng_cuda"] and device.type == "cuda":
                torch.cuda.set_rng_state_all(state["rng_cuda"])
            start = int(state["epochs_done"])
            records = records[:start]
            if dist.main:
                logger.info("resuming %s from epoch %d/%d (%s)", pruned_dir, start, config.epochs, ckpt)
    resumed_from = start

    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    # One sampler for both paths: the order depends only on (seed, epoch), so a resumed run sees
    # exactly the batches the interrupted one would have.
    sampler = DistributedSampler(train.dataset, num_replicas=dist.world, rank=dist.rank, shuffle=True,
                                 seed=config.seed, drop_last=False)
    batches = DataLoader(train.dataset, batch_size=settings["batch_per_process"], sampler=sampler, num_workers=0,
                         pin_memory=device.type == "cuda")
    model: nn.Module = student
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)

    for epoch in range(start, config.epochs):
        sampler.set_epoch(epoch)
        model.train()
        label = f"epoch {epoch + 1}/{config.epochs}"
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        seen, t0 = 0, time.perf_counter()
        for i, (x, y) in enumerate(batches):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=dtype, enabled=amp):
                with torch.no_grad():
                    t_logits = teacher(x)
                s_logits = model(x)
            loss = kd_loss(s_logits, t_logits, y, config.alpha, config.temperature, config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            _zero_masked_grads(masked)  # pruned weights get no update, not even momentum
            scaler.step(optimizer)
            scaler.update()
            apply_masks(student, masks)  # and are forced back to zero whatever the optimizer did
            scheduler.step()
            loss_sum += loss.detach().double() * len(y)
            seen += len(y)
            rate = seen * dist.world / max(1e-9, time.perf_counter() - t0)
            step(label, i + 1, len(batches), epoch=epoch + 1, loss=float(loss_sum) / seen, images_per_s=rate)
        seconds = time.perf_counter() - t0
        totals = torch.stack([loss_sum, torch.tensor(float(seen), dtype=torch.float64, device=device)])
        if dist.world > 1:
            torch.distributed.all_reduce(totals)
            # BatchNorm statistics are per process; rank 0's become everyone's.
            for buf in student.buffers():
                torch.distributed.broadcast(buf, 0)
        record = {"epoch": epoch + 1, "loss": float(totals[0] / totals[1]), "images": int(totals[1]),
                  "seconds": round(seconds, 3), "images_per_s": round(float(totals[1]) / max(1e-9, seconds), 1),
                  "lr_end": scheduler.get_last_lr()[0]}
        records.append(record)
        if dist.main:
            logger.info("%s: loss %.4f, %.0f images/s, %.1f s", label, record["loss"], record["images_per_s"], seconds)
            _save_checkpoint(ckpt, key, student, optimizer, scheduler, scaler, epoch + 1, records)
        dist.barrier()

    student.eval()
    verify_masks(student, {k: v.cpu() for k, v in masks.items()}, patterns, {k: v.cpu() for k, v in zero_before.items()})
    after = {"student": evaluate(student, test, device)} if test is not None else {}
    state = {k: v.detach().cpu().contiguous().clone() for k, v in student.state_dict().items()}
    if os.environ.get(DUMP_ENV):
        dump = Path(os.environ[DUMP_ENV])
        dump.mkdir(parents=True, exist_ok=True)
        artifacts.write_json(dump / f"rank{dist.rank}.json", {"rank": dist.rank, "world": dist.world,
                                                              "state_sha256": _state_hash(state)})

    if dist.main:
        result = {
            "config": config_record,
            "teacher": teacher_record,
            "data": train.description,
            "epochs": records,
            "resumed_from_epoch": resumed_from or None,
            "top1_before": before.get("student"),
            "top1_after": after.get("student"),
            "top1_teacher": before.get("teacher"),
            "top1_split": "digits test" if test is not None else None,
            "input_manifest_sha256": artifacts.manifest_hash(pruned_dir),
        }
        _write_artifact(pruned_dir, target, manifest, state, result, config)
        shutil.rmtree(ckpt, ignore_errors=True)
        if test is not None:
            logger.info("top-1 on the digits test split: %.2f%% -> %.2f%% (teacher %.2f%%)",
                        before["student"], after["student"], before["teacher"])
    dist.barrier()
    return target


_MANIFEST_BASE = ("schema", "kind", "created", "tool_versions", "config", "config_hash", "inputs", "files",
                  "sources")


def _write_artifact(pruned_dir: Path, target: Path, manifest: dict[str, Any], state: dict[str, torch.Tensor],
                    result: dict[str, Any], config: DistillConfig) -> None:
    """A new `distilled` artifact: the input's files with new student weights; source "pruned" = the input.

    The input's model, layers and totals are carried over (export and the audit read them); its prune
    config stays in the input, reached through the source."""
    from safetensors.torch import save_file

    extra = {k: v for k, v in manifest.items() if k not in _MANIFEST_BASE}
    if "distill" in extra:  # distilled before: keep the earlier runs' records
        extra["distill_history"] = [*extra.get("distill_history", []), extra["distill"]]
    extra["distill"] = result
    with artifacts.atomic_dir(target, kind=KIND) as tmp:
        for rel in manifest.get("files", {}):
            if rel != "model.safetensors":
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(pruned_dir / rel, tmp / rel)
        save_file(state, str(tmp / "model.safetensors"))
        artifacts.write_manifest(tmp, KIND, reuse_config(config), extra=extra, sources={"pruned": pruned_dir},
                                 target=target)
