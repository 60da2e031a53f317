"""nn.LSTM (unidirectional, no projection): run unrolled inside the recorded forward, with a
zero probe added to each layer's gate pre-activations; the derivative to the probe is delta_t
per sample and step, and the per-sample weight gradient sum_t delta_t a_t^T (a_t the step's
input or previous hidden state) is one bmm, as for a Linear layer over a sequence."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import Engine, register
from .linear import sequence_linear


@register(nn.LSTM)
class LSTMEngine(Engine):
    def supports(self, mod):
        return (not mod.bidirectional and mod.proj_size == 0
                and (mod.num_layers == 1 or mod.dropout == 0 or not mod.training))

    def hook(self, recorder, module):
        def hook(mod, inputs, output):
            """Recompute the LSTM unrolled, with gate probes, and return that output instead:
            the same values, with the per-step gate derivatives reachable by autograd."""
            x = inputs[0]
            if not torch.is_tensor(x) or x.dim() != 3 or not torch.is_grad_enabled():
                return None  # a PackedSequence or an unbatched input: the generic engine
            hx = inputs[1] if len(inputs) > 1 else None
            out, state, records = _lstm_unrolled(mod, x, hx)
            recorder.calls.setdefault(mod, []).append(records)
            return out, state
        return module.register_forward_hook(hook)

    def batch_size(self, record):
        return record[0][1].shape[0]  # the first layer's input, batch first

    def probes(self, record):
        return [probe for _, _, _, probe in record]

    def accumulate(self, module, record, deltas, weight):
        found = []
        for (layer, a_in, h_prev, _), delta in zip(record, deltas):
            delta = delta.float()
            s_ih, s_bias = sequence_linear(a_in.float(), delta, weight)
            s_hh, _ = sequence_linear(h_prev.float(), delta, weight)
            found += [(getattr(module, f"weight_ih_l{layer}"), s_ih),
                      (getattr(module, f"weight_hh_l{layer}"), s_hh)]
            if module.bias:  # b_ih and b_hh enter every gate the same way
                found += [(getattr(module, f"bias_ih_l{layer}"), s_bias),
                          (getattr(module, f"bias_hh_l{layer}"), s_bias.clone())]
        return found


def _lstm_unrolled(mod: nn.LSTM, x: torch.Tensor, hx=None):
    """nn.LSTM's forward written out step by step (gate order i, f, g, o, as PyTorch's), with
    a zero probe (B, T, 4H) added to the gate pre-activations of each layer. Returns the
    output, (h_n, c_n), and per layer (index, layer input (B, T, I), previous hidden states
    (B, T, H), probe)."""
    if not mod.batch_first:
        x = x.transpose(0, 1)
    b, t_len, _ = x.shape
    h_size, layers = mod.hidden_size, mod.num_layers
    if hx is None:
        zeros = x.new_zeros(layers, b, h_size)
        hx = (zeros, zeros)
    h0, c0 = hx
    layer_in, records, h_last, c_last = x, [], [], []
    for layer in range(layers):
        w_ih, w_hh = getattr(mod, f"weight_ih_l{layer}"), getattr(mod, f"weight_hh_l{layer}")
        # the input part of every step at once, both biases folded in; the probe added once
        # (its derivative is that of every step's gate pre-activations)
        bias = (getattr(mod, f"bias_ih_l{layer}") + getattr(mod, f"bias_hh_l{layer}")
                if mod.bias else None)
        gx = F.linear(layer_in, w_ih, bias)
        probe = torch.zeros(gx.shape, dtype=gx.dtype, device=gx.device, requires_grad=True)
        gx = gx + probe
        w_hh_t = w_hh.t()
        h, c = h0[layer].to(gx.dtype), c0[layer]
        outs, prev = [], []
        for step in range(t_len):  # few, fused ops per step: the loop's cost is per op
            prev.append(h)
            g = torch.addmm(gx[:, step], h, w_hh_t)
            i, f, _, o = g.sigmoid().chunk(4, dim=1)
            c = torch.addcmul(f * c, i, g[:, 2 * h_size:3 * h_size].tanh())
            h = o * c.tanh()
            outs.append(h)
        out = torch.stack(outs, dim=1)
        records.append((layer, layer_in.detach(), torch.stack(prev, dim=1).detach(), probe))
        h_last.append(h)
        c_last.append(c)
        layer_in = out
        if mod.dropout and mod.training and layer < layers - 1:
            layer_in = F.dropout(out, mod.dropout)
    if not mod.batch_first:
        out = out.transpose(0, 1)
    return out, (torch.stack(h_last), torch.stack(c_last)), records
