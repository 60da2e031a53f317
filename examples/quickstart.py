"""sensprune in your own training loop: a plain PyTorch model, optimizer and loss, with the
sensitivity-driven regularizer and a pruning schedule added (MNIST, about 30 s on one core).

    python examples/quickstart.py
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import sensprune
from sensprune.data import batches

torch.manual_seed(0)
torch.set_num_threads(1)
data = sensprune.load_dataset("mnist", limit_train=20_000)   # embedded MNIST, normalized
model = nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(),
                      nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
reg = sensprune.SensitivityRegularizer(model, lam=1e-3)  # the paper's rule, max(0, 1 - S)
pruner = sensprune.Pruner(model, optimizer=optimizer)  # masks live here, not in the model

epochs, target = 8, 0.95                              # remove 95% of the weights (20x)
for epoch in range(epochs):
    for x, y in batches(data.train, 100, shuffle_seed=epoch):
        optimizer.zero_grad()
        with reg.observe(y):                          # S is computed from this forward
            out = model(x)
        F.cross_entropy(out, y).backward()
        optimizer.step()                              # any torch.optim optimizer
        reg.step()                                    # w <- w - lam * w * max(0, 1 - S)
        pruner.apply()                                # pruned weights stay exactly zero
    # after each epoch, prune the smallest weights along a cubic schedule to the target
    pruner.prune_to(target * (1 - (1 - (epoch + 1) / epochs) ** 3))
    val_error, _ = sensprune.evaluate(model, data.val)
    print(f"epoch {epoch + 1}: validation error {val_error:.2f}%")

test_error, _ = sensprune.evaluate(model, data.test)
report = sensprune.sparsity_report(model)
print(f"compression {report['compression_ratio']:.1f}x, test error {test_error:.2f}%")
