"""Sparse Variational Dropout (Molchanov, Ashukha, Vetrov, ICML 2017).

Each Linear/Conv2d weight gets a variance parameter log sigma^2; training maximizes the ELBO
(cross-entropy + KL / N with the paper's KL approximation, its weight 0 for
``vd_kl_delay_epochs`` then annealed linearly to 1 over ``vd_kl_warmup_epochs``), with the local
reparameterization trick; log sigma^2 starts at -10 and log alpha is clipped to [-8, 8], as in
the authors' code. Weights with log alpha = log sigma^2 - log w^2 >= 3 are pruned. The layers are converted in place (same ``weight``/``bias`` names, one extra
``log_sigma2`` parameter each) and turned back into plain layers by ``end_phase`` so the
rest of the run and the exported model are ordinary PyTorch modules.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Method, MethodContext

K1, K2, K3 = 0.63576, 1.87320, 1.48695
LOG_ALPHA_THRESHOLD = 3.0
LOG_ALPHA_CLIP = 8.0


def _log_alpha(mod) -> torch.Tensor:
    return (mod.log_sigma2 - torch.log(mod.weight ** 2 + 1e-8)).clamp(-LOG_ALPHA_CLIP, LOG_ALPHA_CLIP)


class LinearSVDO(nn.Linear):
    def forward(self, x):
        if not self.training:
            return F.linear(x, self.weight * (_log_alpha(self) < LOG_ALPHA_THRESHOLD), self.bias)
        mu = F.linear(x, self.weight, self.bias)
        var = F.linear(x * x, torch.exp(_log_alpha(self)) * self.weight ** 2) + 1e-8
        return mu + var.sqrt() * _noise_like(mu)


class Conv2dSVDO(nn.Conv2d):
    def forward(self, x):
        kw = dict(stride=self.stride, padding=self.padding, dilation=self.dilation,
                  groups=self.groups)
        if not self.training:
            w = self.weight * (_log_alpha(self) < LOG_ALPHA_THRESHOLD)
            return F.conv2d(x, w, self.bias, **kw)
        mu = F.conv2d(x, self.weight, self.bias, **kw)
        var = F.conv2d(x * x, torch.exp(_log_alpha(self)) * self.weight ** 2, None, **kw) + 1e-8
        return mu + var.sqrt() * _noise_like(mu)


def _noise_like(t: torch.Tensor) -> torch.Tensor:
    # torch.randn_like on a channels_last tensor takes a slow non-vectorized path on CPU
    # (8x slower for LeNet-5's conv1 output); a plain contiguous randn is the same law
    return torch.randn(t.shape, dtype=t.dtype, device=t.device)


_SWAP = {nn.Linear: LinearSVDO, nn.Conv2d: Conv2dSVDO}
_BACK = {v: k for k, v in _SWAP.items()}


class SparseVD(Method):
    name = "sparse_vd"
    reads = ("vd_kl_warmup_epochs", "vd_kl_delay_epochs")

    def __init__(self, model: nn.Module, n_train: int, kl_warmup_steps: int = 0, pruner=None,
                 init_log_sigma2: float = -10.0, kl_delay_steps: int = 0):
        self.model, self.n_train, self.pruner = model, int(n_train), pruner
        self.kl_warmup = max(0, int(kl_warmup_steps))
        self.kl_delay = max(0, int(kl_delay_steps))
        self.t = 0
        self.layers = []
        for mod in model.modules():
            if type(mod) in _SWAP:
                mod.__class__ = _SWAP[type(mod)]
                mod.log_sigma2 = nn.Parameter(torch.full_like(mod.weight, init_log_sigma2))
                self.layers.append(mod)
        self.active = True

    @classmethod
    def from_config(cls, cfg, ctx: MethodContext) -> "SparseVD":
        return cls(ctx.model, ctx.n_train, pruner=ctx.pruner,
                   kl_warmup_steps=cfg.vd_kl_warmup_epochs * ctx.steps_per_epoch,
                   kl_delay_steps=cfg.vd_kl_delay_epochs * ctx.steps_per_epoch)

    def extra_params(self) -> list[nn.Parameter]:
        """The log sigma^2 parameters: the loop adds them to its optimizer (no weight decay)."""
        return [m.log_sigma2 for m in self.layers]

    def kl(self) -> torch.Tensor:
        total = 0.0
        for m in self.layers:
            la = _log_alpha(m)
            neg_kl = K1 * torch.sigmoid(K2 + K3 * la) - 0.5 * F.softplus(-la) - K1
            total = total - neg_kl.sum()
        return total

    def penalty(self):
        if not self.active:
            return 0.0
        return self.kl_weight() * self.kl() / self.n_train

    def kl_weight(self) -> float:
        """0 for the delay's steps, then linearly to 1 over the warm-up's steps."""
        t = self.t - self.kl_delay
        if t < 0:
            return 0.0
        return 1.0 if self.kl_warmup == 0 else min(1.0, t / self.kl_warmup)

    def step(self) -> None:
        self.t += 1

    @torch.no_grad()
    def end_phase(self) -> None:
        """Prune log alpha > 3 and turn the layers back into plain nn.Linear / nn.Conv2d."""
        if not self.active:
            return
        names = {id(p): n for n, p in self.model.named_parameters()}
        for m in self.layers:
            keep = _log_alpha(m) < LOG_ALPHA_THRESHOLD
            m.weight.mul_(keep)
            if self.pruner is not None and id(m.weight) in names:
                self.pruner.prune(names[id(m.weight)], keep)
            del m.log_sigma2
            m.__class__ = _BACK[type(m)]
        self.active = False

    def state_dict(self) -> dict:
        return {"t": self.t, "active": self.active}

    def load_state_dict(self, state: dict) -> None:
        self.t = int(state["t"])
        if not state["active"]:
            self.end_phase()
