"""nn.MultiheadAttention (one embedding size for Q, K and V, no bias_k / zero attention):
recomputed inside the recorded forward from its packed ``in_proj_weight`` and ``out_proj``,
with a zero probe added to the Q, K and V projections and to the output projection's output. The
derivative to each probe is delta per sample and position, and each projection's per-sample
gradient is sum_t delta_t a_t^T, as for a Linear over a sequence (its block of the packed
weight). The recomputed output replaces the module's (same values; attention dropout drawn
afresh, as any forward's)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import Engine, register
from .linear import sequence_linear

_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
         "average_attn_weights", "is_causal")
_DEFAULTS = {"key_padding_mask": None, "need_weights": True, "attn_mask": None,
             "average_attn_weights": True, "is_causal": False}


@register(nn.MultiheadAttention)
class AttentionEngine(Engine):
    def supports(self, mod):
        return mod._qkv_same_embed_dim and mod.bias_k is None and not mod.add_zero_attn

    def hook(self, recorder, module):
        def hook(mod, args, kwargs, output):
            call = {**_DEFAULTS, **dict(zip(_ARGS, args)), **kwargs}
            q = call["query"]
            if not torch.is_grad_enabled() or not torch.is_tensor(q) or q.dim() != 3 \
                    or q.is_nested:
                return None  # unbatched or nested input: the generic engine
            out, weights, record = _attention(mod, call)
            recorder.calls.setdefault(mod, []).append(record)
            return out, weights
        return module.register_forward_hook(hook, with_kwargs=True)

    def params(self, module):
        return [p for p in (module.in_proj_weight, module.in_proj_bias, module.out_proj.weight,
                            module.out_proj.bias) if p is not None]

    def batch_size(self, record):
        return record[0].shape[0]

    def probes(self, record):
        return list(record[4:])

    def accumulate(self, module, record, deltas, weight):
        q, k, v, o = (t.float() for t in record[:4])
        parts = [sequence_linear(a, d.float(), weight) for a, d in zip((q, k, v), deltas[:3])]
        s_in = torch.cat([w for w, _ in parts])
        s_in_b = torch.cat([b for _, b in parts])
        s_out, s_out_b = sequence_linear(o, deltas[3].float(), weight)
        return [(module.in_proj_weight, s_in), (module.in_proj_bias, s_in_b),
                (module.out_proj.weight, s_out), (module.out_proj.bias, s_out_b)]


def _attention(mod: nn.MultiheadAttention, call: dict):
    """The module's forward written out (batch first inside), probes added. Returns the
    output in the module's layout, the attention weights (or None), and the record
    (q, k, v inputs and heads' output, batch first, detached; then the four probes)."""
    query, key, value = call["query"], call["key"], call["value"]
    if not mod.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    b, tq, e = query.shape
    ts = key.shape[1]
    h = mod.num_heads
    hd = e // h
    w_q, w_k, w_v = mod.in_proj_weight.chunk(3)
    b_q = b_k = b_v = None
    if mod.in_proj_bias is not None:
        b_q, b_k, b_v = mod.in_proj_bias.chunk(3)
    projected, probes = [], []
    for x, w, bias in ((query, w_q, b_q), (key, w_k, b_k), (value, w_v, b_v)):
        z = F.linear(x, w, bias)
        probe = torch.zeros(z.shape, dtype=z.dtype, device=z.device, requires_grad=True)
        projected.append(z + probe)
        probes.append(probe)
    pq, pk, pv = (z.reshape(b, -1, h, hd).transpose(1, 2) for z in projected)  # (B, H, T, hd)
    mask = _additive_mask(call["attn_mask"], call["key_padding_mask"], b, h, tq, ts, pq.dtype,
                          pq.device)
    p_drop = mod.dropout if mod.training else 0.0
    weights = None
    if call["need_weights"]:
        scores = pq @ pk.transpose(-2, -1) / math.sqrt(hd)
        if mask is not None:
            scores = scores + mask
        attn = scores.softmax(-1)
        weights = attn.mean(1) if call["average_attn_weights"] else attn
        heads = F.dropout(attn, p_drop) @ pv
    else:
        heads = F.scaled_dot_product_attention(pq, pk, pv, attn_mask=mask, dropout_p=p_drop)
    heads = heads.transpose(1, 2).reshape(b, tq, e)
    out = F.linear(heads, mod.out_proj.weight, mod.out_proj.bias)
    probe_o = torch.zeros(out.shape, dtype=out.dtype, device=out.device, requires_grad=True)
    out = out + probe_o
    if not mod.batch_first:
        out = out.transpose(0, 1)
    record = (query.detach(), key.detach(), value.detach(), heads.detach(), *probes, probe_o)
    return out, weights, record


def _additive_mask(attn_mask, key_padding_mask, b, h, tq, ts, dtype, device):
    """attn_mask ((L, S) or (B*H, L, S); True or -inf = not attended) and key_padding_mask
    ((B, S); True = padding) as one float mask broadcast to (B, H, L, S), or None."""
    mask = None
    for m, shape in ((attn_mask, None), (key_padding_mask, (b, 1, 1, ts))):
        if m is None:
            continue
        m = torch.zeros(m.shape, dtype=dtype, device=device).masked_fill_(m, float("-inf")) \
            if m.dtype == torch.bool else m.to(dtype)
        if shape is not None:
            m = m.reshape(shape)
        elif m.dim() == 3:
            m = m.reshape(b, h, tq, ts)
        mask = m if mask is None else mask + m
    return mask
