"""The schedule of a run: its optimizer, its learning-rate schedule, and its phases (warm-up,
sparsification, fine-tuning) with the fine-tuning phase's own rate."""

from __future__ import annotations

import math

import torch

from .config import TrainConfig
from .methods import method_class


def make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.nesterov and cfg.momentum > 0,
                               weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(cfg: TrainConfig, opt: torch.optim.Optimizer):
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    if cfg.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.step_size, gamma=cfg.gamma)
    if cfg.schedule == "linear":  # Sparse VD's protocol: the rate falls linearly to 0
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda e: max(0.0, 1.0 - e / cfg.epochs))
    return None


def phase_of(cfg: TrainConfig, epoch: int) -> str:
    if not method_class(cfg.method).sparsifies:
        return "train"
    if epoch < cfg.warmup_epochs:
        return "warmup"
    if epoch >= cfg.epochs - cfg.finetune_epochs:
        return "finetune"
    return "sparsify"


def finetune_lr(cfg: TrainConfig, epoch: int) -> float:
    """The fine-tuning phase's rate at ``epoch``: constant, or a cosine from finetune_lr
    (first fine-tuning epoch) towards 0 (the last one runs at finetune_lr * (1 - cos(pi/F))/2)."""
    if cfg.finetune_schedule == "constant":
        return cfg.finetune_lr
    k = epoch - (cfg.epochs - cfg.finetune_epochs)  # 0 .. F-1
    return cfg.finetune_lr * 0.5 * (1.0 + math.cos(math.pi * k / cfg.finetune_epochs))
