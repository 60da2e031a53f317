"""sensprune in a Hugging Face Trainer: a BERT classifier pruned to 80% of its weights by the
SensitivityPruningCallback passed to a plain Trainer, no subclass (needs `pip install
transformers accelerate`; about half a minute on one core).

The task is synthetic, so it runs offline: a sequence of 24 tokens is labelled 1 when it holds
more tokens from the upper half of the vocabulary than from the lower half.

    python examples/hf_trainer.py
"""
import tempfile

import torch
import transformers

import sensprune
from sensprune.integrations.transformers import SensitivityPruningCallback

torch.manual_seed(0)
torch.set_num_threads(1)
VOCAB, LENGTH = 200, 24


class CountTask(torch.utils.data.Dataset):
    def __init__(self, n):
        self.ids = torch.randint(1, VOCAB, (n, LENGTH))
        self.labels = ((self.ids >= VOCAB // 2).sum(1) > LENGTH // 2).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=128,
                                 max_position_embeddings=LENGTH, num_labels=2)
model = transformers.BertForSequenceClassification(config)
args = transformers.TrainingArguments(
    output_dir=tempfile.mkdtemp(), max_steps=600, per_device_train_batch_size=32,
    learning_rate=1e-3, use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no",
    disable_tqdm=True)
pruning = SensitivityPruningCallback(lam=1e-3, target=0.8, end=480)  # then 120 steps at 80%
trainer = transformers.Trainer(model=model, args=args, train_dataset=CountTask(19_200),
                               callbacks=[pruning])
trainer.train()

test = CountTask(2000)
model.eval()
with torch.no_grad():
    accuracy = (model(input_ids=test.ids).logits.argmax(1) == test.labels).float().mean().item()
report = sensprune.sparsity_report(model)
print(f"weights pruned {100 - report['remaining_percent']:.1f}% "
      f"({report['compression_ratio']:.1f}x), test accuracy {100 * accuracy:.1f}%")
