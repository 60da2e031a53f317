"""Independent reference: the sensitivity by brute force, one autograd pass per
(sample, output), straight from the definition. Shares no code with sensprune."""

import torch


def brute_force_sensitivity(model, x, targets, kind, reduction, outputs="logits"):
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    logits = model(x)
    y = torch.softmax(logits, -1) if outputs == "probs" else logits
    b, c = y.shape
    s = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in named.items()}

    def grad(scalar):
        gs = torch.autograd.grad(scalar, list(named.values()), retain_graph=True, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for g, p in zip(gs, named.values())]

    if reduction == "sample":
        for n in range(b):
            for k in range(c):
                a = (1.0 if k == int(targets[n]) else 0.0) if kind == "specific" else 1.0 / c
                if a:
                    for name, g in zip(named, grad(y[n, k])):
                        s[name] += a * g.double().abs() / b
    else:
        for k in range(c):
            if kind == "specific":
                a = (targets == k).to(y.dtype)
            else:
                a = torch.full((b,), 1.0 / c)
            if a.any():
                for name, g in zip(named, grad((a * y[:, k]).sum() / b)):
                    s[name] += g.double().abs()
    return s
