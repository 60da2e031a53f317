"""The Lightning callback against the library's own loop, same recipe: LeNet-300-100 on the
embedded MNIST to 100x, `sensprune train --recipe lenet300` (64 epochs: 5 plain, 47 with the
rule and a cubic schedule to 99% pruned, 12 of fine-tuning from lr 0.01, cosine) and a plain
Lightning fit of the same network with SensitivityPruning(lam=1e-3, target=0.99, start=5,
end=52) and the same optimizer, rates and batch size. Prints test error, compression and wall
time side by side and writes JSON. One thread each; the two runs go one after the other.

    python benchmarks/integrations.py [--epochs 64] [--json results/integrations.json]
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import sensprune
from sensprune import make_config, train


def library_run(epochs: int, out: Path) -> dict:
    cfg = make_config("lenet300", out=str(out), progress=False, threads=1,
                      **({} if epochs == 64 else _scaled(epochs)))
    t0 = time.perf_counter()
    s = train(cfg, log=lambda *_: None)
    return {"run": "sensprune train --recipe lenet300", "test_error": s["test_error"],
            "compression_ratio": s["compression_ratio"], "wall_seconds": time.perf_counter() - t0}


def _scaled(epochs: int) -> dict:
    """The recipe's phases scaled to fewer epochs (a quick check of the harness)."""
    warm, fine = max(1, round(5 * epochs / 64)), max(1, round(12 * epochs / 64))
    return {"epochs": epochs, "warmup_epochs": warm, "finetune_epochs": fine}


def lightning_run(epochs: int, out: Path) -> dict:
    import lightning as L
    from sensprune.integrations.lightning import SensitivityPruning
    warnings.filterwarnings("ignore", module="lightning")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = make_config("lenet300", **({} if epochs == 64 else _scaled(epochs)))
    data = sensprune.load_dataset("mnist")  # the recipe's split: 5,000 validation images
    sparsify_end = cfg.epochs - cfg.finetune_epochs

    class LeNet300(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = sensprune.build_model("lenet300")

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, i):
            return F.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=cfg.lr, momentum=cfg.momentum)

            def factor(epoch):  # the recipe's rate: constant, then the fine-tuning cosine
                if epoch < sparsify_end:
                    return 1.0
                k = epoch - sparsify_end
                return cfg.finetune_lr / cfg.lr * 0.5 * (1 + math.cos(math.pi * k / cfg.finetune_epochs))
            return {"optimizer": opt,
                    "lr_scheduler": torch.optim.lr_scheduler.LambdaLR(opt, factor)}

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*data.train),
                                         batch_size=cfg.batch_size, shuffle=True)
    model = LeNet300()
    cb = SensitivityPruning(lam=cfg.lam, target=cfg.target_sparsity, start=cfg.warmup_epochs,
                            end=sparsify_end, decay_floor=cfg.decay_floor)
    trainer = L.Trainer(max_epochs=cfg.epochs, callbacks=[cb], accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(out))
    t0 = time.perf_counter()
    trainer.fit(model, loader)
    wall = time.perf_counter() - t0
    test_error, _ = sensprune.evaluate(model.net, data.test)
    return {"run": "Lightning fit + SensitivityPruning", "test_error": test_error,
            "compression_ratio": sensprune.sparsity_report(model.net)["compression_ratio"],
            "wall_seconds": wall}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=64, help="64: the recipe; fewer: scaled")
    ap.add_argument("--json", default="results/integrations.json", help="where to write rows")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [library_run(args.epochs, Path(tmp) / "lib"),
                lightning_run(args.epochs, Path(tmp) / "lightning")]
    print(f"\nLeNet-300-100, embedded MNIST, {args.epochs} epochs, seed 0, one thread")
    print("| run | compression | test error % | wall s |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['run']} | {r['compression_ratio']:.1f}x | {r['test_error']:.2f} | "
              f"{r['wall_seconds']:.0f} |")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"epochs": args.epochs, "torch": torch.__version__,
                               "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
