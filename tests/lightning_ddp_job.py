"""Run by tests/test_integrations.py: SensitivityPruning under Lightning's strategy="ddp", two
CPU processes (gloo). Each rank writes digests of its masks and of its last S to
rank<i>.json in the folder given as the argument."""

import hashlib
import json
import sys
import warnings
from pathlib import Path

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F

from sensprune import sparsity_report
from sensprune.integrations.lightning import SensitivityPruning


class MLP(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 4))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, i):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def digest(tensors):
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def main(out: Path):
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(800, 20, generator=g)
    y = (x @ torch.randn(20, 4, generator=g)).argmax(1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=40)
    model = MLP()
    cb = SensitivityPruning(lam=1e-3, target=0.8)
    trainer = L.Trainer(max_epochs=3, strategy="ddp", devices=2, accelerator="cpu",
                        callbacks=[cb], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False,
                        default_root_dir=str(out))
    trainer.fit(model, loader)
    r = sparsity_report(model)
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps({
        "masks": digest({n: m.float() for n, m in cb.pruner.masks.items()}),
        "insensitivity": digest(cb.regularizer.insensitivity),
        "zeros": 1 - r["nonzero_params"] / r["total_params"]}))
    # leave together and tear the group down before the interpreter does: a rank whose
    # process exits while gloo's threads still serve the other can abort ("terminate called")
    trainer.strategy.barrier()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
