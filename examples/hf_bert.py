"""sensprune on a Hugging Face transformer in your own training loop: a raw
BertForSequenceClassification (no wrapper), its own loss, AdamW, the regularizer and a pruning
schedule to 80% of the weights (needs `pip install transformers`; about a minute on one core).

The task is synthetic, so it runs offline: a sequence of 24 tokens is labelled 1 when it holds
more tokens from the upper half of the vocabulary than from the lower half.

    python examples/hf_bert.py

(Not named transformers.py: run as a script, such a file would shadow the package.)
"""
import torch
import transformers

import sensprune

torch.manual_seed(0)
torch.set_num_threads(1)
VOCAB, LENGTH = 200, 24


def batch(n):
    ids = torch.randint(1, VOCAB, (n, LENGTH))
    labels = ((ids >= VOCAB // 2).sum(1) > LENGTH // 2).long()
    return ids, labels


config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=128,
                                 max_position_embeddings=LENGTH, num_labels=2)
model = transformers.BertForSequenceClassification(config)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
reg = sensprune.SensitivityRegularizer(model, lam=1e-3)  # every Linear weight (Q, K, V too)
pruner = sensprune.Pruner(model, optimizer=optimizer)  # embedding tables stay dense

steps, target = 600, 0.8
for step in range(steps):
    ids, labels = batch(32)
    optimizer.zero_grad()
    with reg.observe(labels):                       # S from this very forward
        out = model(input_ids=ids, labels=labels)   # a ModelOutput: its logits are used
    out.loss.backward()                             # the model's own loss
    optimizer.step()
    reg.step()                                      # w <- w - lam * w * max(0, 1 - S)
    pruner.apply()                                  # pruned weights and Adam moments stay 0
    if (step + 1) % 50 == 0:                        # cubic schedule over the first 80% of steps
        pruner.prune_to(sensprune.cubic_sparsity(target, (step + 1) / (0.8 * steps)))

model.eval()
ids, labels = batch(2000)
with torch.no_grad():
    accuracy = (model(input_ids=ids).logits.argmax(1) == labels).float().mean().item()
report = sensprune.sparsity_report(model)
print(f"weights pruned {100 - report['remaining_percent']:.1f}% "
      f"({report['compression_ratio']:.1f}x), test accuracy {100 * accuracy:.1f}%")
