"""Evaluation: the error and loss of a model on in-memory data, and of a trained run."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import batches, load_dataset, num_samples
from .pruning import sparsity_report


@torch.no_grad()
def evaluate(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor],
             batch_size: int = 1000) -> tuple[float, float]:
    """(error in percent, mean cross-entropy) on in-memory data, in eval mode."""
    was_training = model.training
    model.eval()
    wrong, loss_sum = 0, 0.0
    device = next(model.parameters()).device
    for x, y in batches(data, batch_size):
        x, y = x.to(device), y.to(device)
        out = model(x).float()
        loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
        wrong += int((out.argmax(1) != y).sum())
    model.train(was_training)
    n = max(num_samples(data), 1)
    return 100.0 * wrong / n, loss_sum / n


def evaluate_run(path: str | Path, data_dir: str | None = None) -> dict:
    """Test and validation error and per-layer zeros of a trained run (a run directory, its
    checkpoint.pt or its model.pt): what ``sensprune evaluate`` prints."""
    from .checkpoint import load_run_model

    cfg, model = load_run_model(path)
    splits = load_dataset(cfg.dataset, data_dir or cfg.data_dir, cfg.val_size)
    test_err, test_loss = evaluate(model, splits.test)
    val_err, _ = evaluate(model, splits.val)
    sp = sparsity_report(model)
    return {"model": cfg.model, "dataset": cfg.dataset, "test_error": test_err,
            "test_loss": test_loss, "val_error": val_err,
            "total_params": sp["total_params"], "nonzero_params": sp["nonzero_params"],
            "compression_ratio": sp["compression_ratio"],
            "remaining_per_layer": {n: v["remaining_percent"] for n, v in sp["layers"].items()}}
