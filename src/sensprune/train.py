"""The training loop: phases, evaluation, thresholding, checkpoints, resume, metrics, progress.

One run = warmup epochs (plain training) -> sparsification epochs (the regularizer after every
optimizer step, a threshold at every epoch end) -> fine-tuning epochs (masks fixed). Every
epoch ends with an evaluation, a metrics line (metrics.jsonl) and an atomic checkpoint, so an
interrupted run resumes exactly where it stopped (``resume=True``).
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._version import __version__
from . import distributed as ddp
from .config import TrainConfig
from .data import Splits, background, batches, load_dataset, num_samples
from .errors import ConfigError, SensPruneError, TrainingDiverged
from .models import build_model, use_channels_last
from .pruning import Pruner, sparsity_report
from .evaluation import evaluate, evaluate_run  # noqa: F401  (re-exported: the public API)
from .methods import EpochEnd, MethodContext, make_method
from .schedule import finetune_lr, make_optimizer, make_scheduler, phase_of  # noqa: F401
from .checkpoint import (CHECKPOINT, restore_run, save_atomic, save_run, state_digest,
                         write_text_atomic)
from .report import summary_markdown
from .results import RunSummary
from .rundir import claim, record as record_files


def resolve_device(name: str, info: "ddp.DistInfo") -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA device is visible; use --device cpu")
        return torch.device("cuda", info.local_rank)
    return torch.device("cpu")


def _progress(iterable, total: int, enabled: bool, desc: str):
    # a bar redrawn into a log file or a pipe is noise (and megabytes): terminals only
    if enabled and sys.stdout.isatty() and sys.stderr.isatty():
        try:
            from tqdm.auto import tqdm
            return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)
        except ImportError:
            pass
    return None


def train(cfg: TrainConfig, resume: bool = False, splits: Splits | None = None,
          stop_after_epoch: int | None = None, log=print,
          overwrite: bool = False) -> RunSummary | dict:
    """Run ``cfg`` to the end (or resume it) and return its :class:`RunSummary` (the contract
    of summary.json). DDP ranks other than 0 get ``{"rank": r}``; a run stopped by
    ``stop_after_epoch`` gets ``{"stopped_at_epoch": n}``.

    ``cfg.out`` is claimed first (rundir.claim): a directory holding another run is refused
    unless ``overwrite`` (or ``resume``, which must then find the same settings).
    ``stop_after_epoch`` ends the process-equivalent early (used to test resume).
    """
    if resume and not (Path(cfg.out) / CHECKPOINT).exists():
        raise ConfigError(f"--resume: no checkpoint in {cfg.out}; run without --resume first "
                          "or pass the right --out")
    if cfg.init_from is not None and not resume and not Path(cfg.init_from).exists():
        # checked here, not in validate(): a resumed run never reads it again
        raise ConfigError(f"init_from: {cfg.init_from} does not exist; give a run directory "
                          "or its model.pt")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # decayed weights pass through subnormal floats on their way to the threshold, and CPU
    # arithmetic on subnormals is ~100x slower (a LeNet-300 epoch went from 3 s to 20 s)
    torch.set_flush_denormal(True)
    joined = ddp.active()  # a process group the caller made is the caller's to tear down
    info = ddp.setup()
    try:
        return _claimed(cfg, info, resume, splits, stop_after_epoch, log, overwrite)
    finally:
        if not joined:
            ddp.cleanup()


def _claimed(cfg: TrainConfig, info: "ddp.DistInfo", resume: bool, splits: Splits | None,
             stop_after_epoch: int | None, log, overwrite: bool) -> dict:
    """Claim ``cfg.out`` on every rank (or on none), then train."""
    with contextlib.ExitStack() as stack:
        error = run_claim = None
        try:
            run_claim = stack.enter_context(claim(cfg.out, resume=resume, overwrite=overwrite,
                                                  main=info.is_main))
        except SensPruneError as exc:
            error = exc
        if not ddp.all_ok(error is None):  # every rank starts, or none does
            raise error or ConfigError(f"another rank could not claim --out {cfg.out}; its "
                                       "message says why")
        return _train(cfg, info, resume, splits, stop_after_epoch,
                      log if info.is_main else (lambda *_: None), run_claim)  # rank 0 reports


@dataclass
class _Run:
    """What one training run holds, built once by :func:`_setup`."""
    cfg: TrainConfig
    out: Path
    splits: Splits
    model: nn.Module
    net: nn.Module  # the model, or its DDP wrapper for the forward
    device: torch.device
    opt: torch.optim.Optimizer
    sched: Any
    pruner: Pruner
    method: Any
    state: dict
    steps_per_epoch: int
    teacher: nn.Module | None = None  # distillation (cfg.teacher), eval mode, no grad


def _setup(cfg: TrainConfig, info: "ddp.DistInfo", resume: bool, splits: Splits | None,
           log, run_claim) -> _Run:
    """Data, model, optimizer, pruner and method; the checkpoint restored, or a fresh start."""
    out = Path(cfg.out)
    splits = splits or load_dataset(cfg.dataset, cfg.data_dir, cfg.val_size, cfg.limit_train)
    if cfg.shift_augment and (splits.augment or not isinstance(splits.train, tuple)
                              or splits.train[0].dim() != 4):
        raise ConfigError(f"shift_augment applies to in-memory image datasets (MNIST, "
                          f"Fashion-MNIST); {cfg.dataset} has its own augmentation: set it to 0")
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, splits.info.num_classes, splits.info.input_shape)
    device = resolve_device(cfg.device, info)
    model.to(device)
    use_channels_last(model, splits.info.input_shape)  # conv nets, every device
    opt = make_optimizer(cfg, model.parameters())
    pruner = Pruner(model, optimizer=opt)
    if cfg.init_from and not resume:
        _init_from(cfg, model, pruner)
    steps_per_epoch = math.ceil(num_samples(splits.train) / cfg.batch_size)
    method = make_method(cfg, MethodContext(model, opt, pruner, steps_per_epoch,
                                            num_samples(splits.train), is_main=info.is_main,
                                            broadcast=ddp.broadcast_float))
    extra = method.extra_params()  # Sparse VD's log sigma^2
    if extra:
        opt.add_param_group({"params": extra, "weight_decay": 0.0})
    # forward through DDP (gradient all-reduce); everything else works on the plain module
    net = model
    if info.enabled:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    sched = make_scheduler(cfg, opt)
    state: dict[str, Any] = {"epoch": 0, "train_seconds": 0.0, "reference_val_error": None,
                             "thresholds": []}
    ckpt_path = out / CHECKPOINT
    if resume and ckpt_path.exists():
        state = restore_run(ckpt_path, cfg, model, opt, sched, method, pruner, device)
        _truncate_metrics(out / "metrics.jsonl", state["epoch"])
        log(f"resumed from {ckpt_path} at epoch {state['epoch']}")
    else:  # a fresh start: no history to keep
        # everything is checked by now (settings, data, model, device): the old run, if this
        # one replaces it, moves aside, and goes for good after the first checkpoint
        run_claim.replace_previous()
        if info.is_main:
            (out / "metrics.jsonl").unlink(missing_ok=True)
    return _Run(cfg, out, splits, model, net, device, opt, sched, pruner, method, state,
                steps_per_epoch, _load_teacher(cfg, device))


def _train(cfg: TrainConfig, info: "ddp.DistInfo", resume: bool, splits: Splits | None,
           stop_after_epoch: int | None, log, run_claim) -> dict:
    run = _setup(cfg, info, resume, splits, log, run_claim)
    for epoch in range(run.state["epoch"], cfg.epochs):
        phase, next_phase = phase_of(cfg, epoch), phase_of(cfg, epoch + 1)
        if phase == "finetune" and cfg.finetune_lr > 0:
            run.sched = None  # the fine-tuning phase runs at its own rate
            for group in run.opt.param_groups:
                group["lr"] = finetune_lr(cfg, epoch)
        t0 = time.perf_counter()
        train_loss, train_error = _train_epoch(run, info, epoch, phase)
        threshold = _epoch_end(run, epoch, phase, next_phase)
        run.state["train_seconds"] += time.perf_counter() - t0
        bad = [n for n, p in run.model.named_parameters() if not bool(torch.isfinite(p).all())]
        if bad:  # before the checkpoint: the last good one stays on disk
            raise _diverged(cfg, run.out, epoch, "its end", f"{bad[0]} holds NaN or inf values")
        run.state["epoch"] = epoch + 1
        if info.is_main:
            _record_epoch(run, epoch, phase, next_phase, (train_loss, train_error), threshold,
                          time.perf_counter() - t0, log)
            run_claim.commit()
        ddp.barrier()  # the checkpoint exists for every rank before anyone goes on
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
            return {"stopped_at_epoch": epoch + 1}
    result = finish(cfg, run.model, run.splits, run.state, run.out) if info.is_main \
        else {"rank": info.rank}
    # every rank leaves together: a rank that tears its process group down while rank 0 is
    # still writing the summary can abort in gloo's threads
    ddp.barrier()
    return result


def _train_epoch(run: _Run, info: "ddp.DistInfo", epoch: int, phase: str) -> tuple[float, float]:
    """One pass over the training data; (mean loss, error %) of what it saw."""
    cfg, model, method, opt = run.cfg, run.model, run.method, run.opt
    use_amp = cfg.amp and run.device.type == "cuda"
    torch.manual_seed(cfg.seed * 100_003 + epoch)  # dropout etc.: reproducible per epoch
    model.train()
    loss_sum = wrong = seen = 0
    it = batches(run.splits.train, cfg.batch_size, shuffle_seed=cfg.seed * 1_000_003 + epoch,
                 augment=run.splits.augment, workers=cfg.workers,
                 shift=cfg.shift_augment, fill=background(run.splits.info))
    bar = _progress(it, run.steps_per_epoch, cfg.progress and info.is_main,
                    f"epoch {epoch + 1}/{cfg.epochs} {phase}")
    active = phase == "sparsify"  # the method acts in the sparsification phase only
    for x, y in bar if bar is not None else it:
        n_global = len(y)
        if info.enabled:  # this rank's slice of the global batch
            part = ddp.shard(n_global, info)
            x, y = x[part], y[part]
        x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
        opt.zero_grad(set_to_none=True)
        with method.observe(y) if active else contextlib.nullcontext(), \
                torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=use_amp):
            logits = run.net(x)
        logits = logits.float()
        # sum / global batch size, times world size because DDP averages over ranks:
        # the gradient is exactly that of the mean loss over the global batch
        loss_sum_batch = F.cross_entropy(logits, y, reduction="sum")
        objective = loss_sum_batch
        if run.teacher is not None:
            objective = _distilled(cfg, run.teacher, x, logits, loss_sum_batch)
        loss = objective * (info.world_size / n_global)
        (loss + method.penalty() if active else loss).backward()
        opt.step()
        if active:
            method.step()
        run.pruner.apply()
        # one sync per step, needed anyway for the running loss. Checked after the step, so
        # that under DDP every rank has finished its all-reduce before any of them stops
        batch_loss = float(loss_sum_batch.detach())
        if not ddp.finite_everywhere(loss_sum_batch, batch_loss):  # all stop at this step
            raise _diverged(cfg, run.out, epoch, f"step {seen // max(len(y), 1) + 1}",
                            f"the loss is {batch_loss}" if not math.isfinite(batch_loss)
                            else "another rank's loss is not finite")
        loss_sum += batch_loss
        wrong += int((logits.argmax(1) != y).sum())
        seen += len(y)
        if bar is not None and (seen // max(len(y), 1)) % 20 == 0:
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", err=f"{100 * wrong / seen:.2f}%",
                            remain=f"{100 * run.pruner.nonzero() / max(1, _numel(run.pruner)):.1f}%")
    if bar is not None:
        bar.close()
    if run.sched is not None:
        run.sched.step()
    return loss_sum / max(seen, 1), 100.0 * wrong / max(seen, 1)


def _epoch_end(run: _Run, epoch: int, phase: str, next_phase: str) -> float | None:
    """The method's epoch-end decision in the sparsification phase (the threshold it applied,
    if any), and the end of that phase."""
    if phase != "sparsify":
        return None
    last = next_phase != "sparsify"
    threshold = run.method.epoch_end(EpochEnd(run.state, epoch + 1 - run.cfg.warmup_epochs, last,
                                              lambda: evaluate(run.model, run.splits.val)))
    if threshold is not None:  # every rank holds rank 0's masks
        ddp.broadcast_masks(run.pruner.masks)
        run.pruner.masks_changed()
        run.pruner.apply()
    if last:
        run.method.end_phase()
    return threshold


def _record_epoch(run: _Run, epoch: int, phase: str, next_phase: str,
                  train: tuple[float, float], threshold: float | None, seconds: float,
                  log) -> None:
    """Rank 0: evaluate, append the metrics line, log it, write the checkpoint."""
    val_err, _ = evaluate(run.model, run.splits.val)
    test_err, _ = evaluate(run.model, run.splits.test)
    run.method.record_epoch(run.state, val_err, sparsification_starts=(
        phase == "warmup" and next_phase == "sparsify"))
    sp = sparsity_report(run.model)
    record = {
        "epoch": epoch + 1, "phase": phase, "train_loss": train[0], "train_error": train[1],
        "val_error": val_err, "test_error": test_err,
        "remaining_percent": sp["remaining_percent"],
        "compression_ratio": sp["compression_ratio"], "threshold": threshold,
        "lr": run.opt.param_groups[0]["lr"], "seconds": seconds,
        **(run.method.epoch_stats() if phase == "sparsify" else {}),
    }
    with open(run.out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record, allow_nan=False) + "\n")
    # recorded at once: if the checkpoint write below is interrupted, --overwrite can still
    # tell this run's metrics from a file the user put there
    record_files(run.out, "metrics.jsonl")
    log(f"epoch {epoch + 1:3d}/{run.cfg.epochs} {phase:8s} loss {train[0]:.4f} "
        f"val {val_err:5.2f}% test {test_err:5.2f}% remaining "
        f"{sp['remaining_percent']:6.2f}% ({sp['compression_ratio']:.1f}x)"
        + (f" T={threshold:.3g}" if threshold is not None else ""))
    save_run(run.out / CHECKPOINT, run.cfg, run.model, run.opt, run.sched, run.method,
             run.pruner, run.state)
    record_files(run.out, CHECKPOINT, "metrics.jsonl")


def _init_from(cfg: TrainConfig, model: nn.Module, pruner: Pruner) -> None:
    """Load a trained run's weights; its zero weights become masks (they stay zero)."""
    from .checkpoint import load_run_model

    src_cfg, src = load_run_model(cfg.init_from)
    if src_cfg.model != cfg.model:
        raise ConfigError(f"init_from: {cfg.init_from} holds a {src_cfg.model}, this run trains "
                          f"a {cfg.model}; give --model {src_cfg.model} or another run")
    model.load_state_dict(src.state_dict())
    for name, p in pruner.params.items():
        pruner.prune(name, p.detach() != 0)


def _load_teacher(cfg: TrainConfig, device: torch.device) -> nn.Module | None:
    """The trained run to distil from (read like --init-from: no code from the file)."""
    if not cfg.teacher:
        return None
    from .checkpoint import load_run_model

    teacher_cfg, teacher = load_run_model(cfg.teacher)
    if teacher_cfg.dataset != cfg.dataset:
        raise ConfigError(f"teacher: {cfg.teacher} was trained on {teacher_cfg.dataset}, this run "
                          f"on {cfg.dataset}; give a teacher trained on the same data")
    teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _distilled(cfg: TrainConfig, teacher: nn.Module, x: torch.Tensor, logits: torch.Tensor,
               ce_sum: torch.Tensor) -> torch.Tensor:
    """Summed over the batch: (1 - a) CE + a tau^2 KL(teacher_tau || student_tau) (Hinton et
    al. 2015; tau^2 keeps the soft term's gradient scale independent of tau)."""
    tau, a = cfg.distill_temperature, cfg.distill_weight
    with torch.no_grad():
        soft = F.log_softmax(teacher(x).float() / tau, dim=1)
    kl = F.kl_div(F.log_softmax(logits / tau, dim=1), soft, log_target=True, reduction="sum")
    return (1 - a) * ce_sum + a * tau * tau * kl


def _diverged(cfg: TrainConfig, out: Path, epoch: int, where: str, what: str) -> TrainingDiverged:
    kept = (f"the checkpoint of epoch {epoch} in {out} is kept" if epoch and
            (out / CHECKPOINT).exists() else "no checkpoint was written")
    return TrainingDiverged(
        f"training diverged at epoch {epoch + 1}, {where}: {what}; {kept}. Lower --lr "
        f"(now {cfg.lr:g}) or --lam (now {cfg.lam:g}) and train again")


def _truncate_metrics(path: Path, epochs_done: int) -> None:
    """Drop metrics lines of epochs whose checkpoint was never written (a crash between)."""
    if path.exists():
        lines = path.read_text().splitlines(keepends=True)
        write_text_atomic("".join(lines[:epochs_done]), path)


def _numel(pruner: Pruner) -> int:
    return sum(m.numel() for m in pruner.masks.values())


def finish(cfg: TrainConfig, model: nn.Module, splits: Splits, state: dict,
           out: Path) -> RunSummary:
    """Final evaluation; writes model.pt, summary.json and summary.md."""
    val_err, _ = evaluate(model, splits.val)
    test_err, _ = evaluate(model, splits.test)
    sp = sparsity_report(model)
    summary = {
        "model": cfg.model, "dataset": cfg.dataset, "method": cfg.method,
        "test_error": test_err, "val_error": val_err,
        "total_params": sp["total_params"], "nonzero_params": sp["nonzero_params"],
        "compression_ratio": sp["compression_ratio"],
        "remaining_per_layer": {n: v["remaining_percent"] for n, v in sp["layers"].items()},
        "layers": sp["layers"],
        "all_params": sum(p.numel() for p in model.parameters()),
        "epochs": cfg.epochs, "train_seconds": state["train_seconds"],
        "thresholds": state["thresholds"], "reference_val_error": state["reference_val_error"],
        "config": cfg.to_dict(),
        "versions": {"sensprune": __version__, "torch": torch.__version__},
        "model_sha256": state_digest(model.state_dict()),  # checked when model.pt is read
    }
    save_atomic(model.state_dict(), out / "model.pt")
    write_text_atomic(json.dumps(summary, indent=2, allow_nan=False) + "\n", out / "summary.json")
    write_text_atomic(summary_markdown(summary), out / "summary.md")
    record_files(out, "model.pt", "summary.json", "summary.md")
    return RunSummary.from_dict(summary)
