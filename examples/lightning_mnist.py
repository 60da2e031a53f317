"""sensprune in a Lightning fit: LeNet-300-100 on the embedded MNIST, pruned to 95% of its
weights (20x) by the SensitivityPruning callback; the LightningModule is plain Lightning
(needs `pip install lightning`; about a minute on one core).

    python examples/lightning_mnist.py
"""
import warnings

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F

import sensprune
from sensprune.integrations.lightning import SensitivityPruning

warnings.filterwarnings("ignore", module="lightning")  # its tips about loggers and workers
torch.manual_seed(0)
torch.set_num_threads(1)
data = sensprune.load_dataset("mnist", limit_train=20_000)   # embedded MNIST, normalized


class LeNet300(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(),
                                 nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*data.train),
                                     batch_size=100, shuffle=True)
model = LeNet300()
pruning = SensitivityPruning(lam=1e-3, target=0.95, end=6)  # cubic to 95% by epoch 6 of 8
trainer = L.Trainer(max_epochs=8, callbacks=[pruning], accelerator="cpu", logger=False,
                    enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False)
trainer.fit(model, loader)

test_error, _ = sensprune.evaluate(model, data.test)
print(f"compression {sensprune.sparsity_report(model)['compression_ratio']:.1f}x, "
      f"test error {test_error:.2f}%")
