"""nn.LSTM and nn.GRU (unidirectional, no projection), in two stages so the training forward
and backward keep PyTorch's fused kernels:
1. the layer's outputs (output, h_n, and c_n for an LSTM) get zero probes: the model's
   derivatives dy/d(output) per sample come from the same backward as every other layer's;
2. the layer is written out step by step on detached copies of its inputs and weights, with
   a zero probe on each step's gate pre-activations, and the stage-1 derivatives are carried
   back through it to the gates: delta_t per sample and step.
The per-sample gradient of W_ih is sum_t delta_t x_t^T (x_t the step's input) and of W_hh
sum_t delta_t h_{t-1}^T: one bmm each, as for a Linear over a sequence. For the GRU the
hidden part of the candidate gate enters multiplied by the reset gate, so W_hh has its own
probe. Dropout between stacked layers in training mode draws a mask the second stage cannot
see: such layers go to the generic path."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import Engine, parameter_uses, register
from .linear import sequence_linear


class _Recurrent(Engine):
    gates = 4  # gate blocks in the weights (LSTM i, f, g, o; GRU r, z, n: 3)

    def supports(self, mod):
        return (not mod.bidirectional and getattr(mod, "proj_size", 0) == 0
                and (mod.num_layers == 1 or mod.dropout == 0 or not mod.training))

    def hook(self, recorder, module):
        def hook(mod, inputs, output):
            x = inputs[0]
            if not torch.is_tensor(x) or x.dim() != 3 or not torch.is_grad_enabled():
                return None  # a PackedSequence or an unbatched input: the generic engine
            hx = inputs[1] if len(inputs) > 1 else None
            out, state = output
            fused = out
            # the fused kernel may read a weight once per step: count this call's own reads
            states = hx if isinstance(hx, tuple) else (hx,) if hx is not None else ()
            stop = {t.grad_fn for t in (x, *states) if t.grad_fn is not None}
            uses = parameter_uses([out, *(state if isinstance(state, tuple) else (state,))],
                                  stop)
            probes = []

            def probed(t):
                p = torch.zeros(t.shape, dtype=t.dtype, device=t.device, requires_grad=True)
                probes.append(p)
                return t + p
            out = probed(out)
            state = tuple(probed(s) for s in state) if isinstance(state, tuple) else probed(state)
            detach = (lambda h: None if h is None else
                      tuple(s.detach() for s in h) if isinstance(h, tuple) else h.detach())
            recorder.calls.setdefault(mod, []).append((x.detach(), detach(hx), probes,
                                                        mod.batch_first, uses, fused.detach()))
            return out, state
        return module.register_forward_hook(hook)

    def graph_uses(self, module, record):
        return {id(p): record[4].get(id(p), 0) for p in self.params(module)}

    def batch_size(self, record):
        return record[0].shape[0 if record[3] else 1]

    def probes(self, record):
        return record[2]

    def accumulate(self, module, record, deltas, weight):
        x, hx = record[:2]
        found = []
        for layer, a_in, h_prev, d_x, d_h in self._gate_deltas(module, x, hx, deltas, record[5]):
            s_ih, s_bias_ih = sequence_linear(a_in.float(), d_x.float(), weight)
            s_hh, s_bias_hh = sequence_linear(h_prev.float(), d_h.float(), weight)
            found += [(getattr(module, f"weight_ih_l{layer}"), s_ih),
                      (getattr(module, f"weight_hh_l{layer}"), s_hh)]
            if module.bias:
                found += [(getattr(module, f"bias_ih_l{layer}"), s_bias_ih),
                          (getattr(module, f"bias_hh_l{layer}"), s_bias_hh)]
        return found

    def _gate_deltas(self, module, x, hx, deltas, out=None):
        """Stage 2: per layer (index, layer input (B, T, I), previous hidden states (B, T, H),
        derivatives (K, B, T, G*H) at the input part and at the hidden part of the gates)."""
        with torch.enable_grad():
            outputs, records = self.unrolled(module, x, hx, detached=True)
            rows = deltas[0].shape[0]
            targets = [t for t in outputs]
            probes = [p for rec in records for p in rec[3:]]
            per_row = []
            for k in range(rows):
                per_row.append(torch.autograd.grad(
                    targets, probes, [d[k].to(t.dtype) for d, t in zip(deltas, targets)],
                    retain_graph=k < rows - 1, allow_unused=True))
        found = []
        for i, rec in enumerate(records):
            layer, a_in, h_prev = rec[:3]
            n = len(rec) - 3
            grads = []
            for j in range(n):
                g = [r[i * n + j] for r in per_row]
                p = rec[3 + j]
                grads.append(torch.stack([torch.zeros_like(p) if t is None else t for t in g]))
            d_x = grads[0]
            d_h = grads[1] if n > 1 else grads[0]
            found.append((layer, a_in, h_prev, d_x, d_h))
        return found


@register(nn.LSTM)
class LSTMEngine(_Recurrent):
    @staticmethod
    def unrolled(mod, x, hx=None, detached=False):
        return _lstm_unrolled(mod, x, hx, detached)

    def _gate_deltas(self, module, x, hx, deltas, out=None):
        """Stage 2 by hand: backpropagation through time in closed form (no autograd graph:
        a step is a handful of fused ops), all K rows at once."""
        return _lstm_gate_deltas(module, x, hx, deltas, out)


@register(nn.GRU)
class GRUEngine(_Recurrent):
    gates = 3

    @staticmethod
    def unrolled(mod, x, hx=None, detached=False):
        return _gru_unrolled(mod, x, hx, detached)


def _weights(mod, layer, detached):
    names = (f"weight_ih_l{layer}", f"weight_hh_l{layer}", f"bias_ih_l{layer}",
             f"bias_hh_l{layer}")
    ws = [getattr(mod, n) if mod.bias or n.startswith("weight") else None for n in names]
    return [w.detach() if detached and w is not None else w for w in ws]


def _zero_probe(like):
    return torch.zeros(like.shape, dtype=like.dtype, device=like.device, requires_grad=True)


def _batch_first_input(mod: nn.RNNBase, x: torch.Tensor, hx, detached: bool):
    """(x as (B, T, I), hx); ``detached``: detached copies in the weights' dtype (the recorded
    forward may have run under autocast). hx: None, a tensor (GRU) or a pair (LSTM)."""
    if detached:
        dtype = mod.weight_ih_l0.dtype
        x = x.detach().to(dtype)
        if isinstance(hx, tuple):
            hx = tuple(h.detach().to(dtype) for h in hx)
        elif hx is not None:
            hx = hx.detach().to(dtype)
    if not mod.batch_first:
        x = x.transpose(0, 1)
    return x, hx


def _lstm_unrolled(mod: nn.LSTM, x: torch.Tensor, hx=None, detached: bool = False):
    """nn.LSTM's forward written out step by step (gate order i, f, g, o, as PyTorch's), with
    a zero probe (B, T, 4H) added to the gate pre-activations of each layer. Returns the
    outputs (output, h_n, c_n) and per layer (index, layer input (B, T, I), previous hidden
    states (B, T, H), probe). ``detached``: on detached copies of x, hx and the weights."""
    x, hx = _batch_first_input(mod, x, hx, detached)
    b, t_len, _ = x.shape
    h_size, layers = mod.hidden_size, mod.num_layers
    if hx is None:
        zeros = x.new_zeros(layers, b, h_size)
        hx = (zeros, zeros)
    h0, c0 = hx
    layer_in, records, h_last, c_last = x, [], [], []
    for layer in range(layers):
        w_ih, w_hh, b_ih, b_hh = _weights(mod, layer, detached)
        # the input part of every step at once, both biases folded in; the probe added once
        # (its derivative is that of every step's gate pre-activations)
        gx = F.linear(layer_in, w_ih, b_ih + b_hh if b_ih is not None else None)
        probe = _zero_probe(gx)
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
    return (out, torch.stack(h_last), torch.stack(c_last)), records


def _gru_unrolled(mod: nn.GRU, x: torch.Tensor, hx=None, detached: bool = False):
    """nn.GRU's forward written out step by step (gate order r, z, n, as PyTorch's):
    n = tanh(W_in x + b_in + r * (W_hn h + b_hn)), h' = (1 - z) n + z h. Zero probes on the
    input part (B, T, 3H) and on each step's hidden part (B, T, 3H) of the gates. Returns
    the outputs (output, h_n) and per layer (index, layer input, previous hidden states,
    input probe, hidden probe)."""
    x, hx = _batch_first_input(mod, x, hx, detached)
    b, t_len, _ = x.shape
    h_size, layers = mod.hidden_size, mod.num_layers
    if hx is None:
        hx = x.new_zeros(layers, b, h_size)
    layer_in, records, h_last = x, [], []
    for layer in range(layers):
        w_ih, w_hh, b_ih, b_hh = _weights(mod, layer, detached)
        gx = F.linear(layer_in, w_ih, b_ih)
        probe_x = _zero_probe(gx)
        gx = gx + probe_x
        probe_h = _zero_probe(gx)
        w_hh_t = w_hh.t()
        h = hx[layer].to(gx.dtype)
        outs, prev = [], []
        for step in range(t_len):
            prev.append(h)
            gh = (torch.addmm(b_hh, h, w_hh_t) if b_hh is not None else h.mm(w_hh_t))
            gh = gh + probe_h[:, step]
            x_r, x_z, x_n = gx[:, step].chunk(3, dim=1)
            h_r, h_z, h_n = gh.chunk(3, dim=1)
            r = torch.sigmoid(x_r + h_r)
            z = torch.sigmoid(x_z + h_z)
            n = torch.tanh(torch.addcmul(x_n, r, h_n))
            h = torch.addcmul(n, z, h - n)
            outs.append(h)
        out = torch.stack(outs, dim=1)
        records.append((layer, layer_in.detach(), torch.stack(prev, dim=1).detach(), probe_x,
                        probe_h))
        h_last.append(h)
        layer_in = out
        if mod.dropout and mod.training and layer < layers - 1:
            layer_in = F.dropout(out, mod.dropout)
    if not mod.batch_first:
        out = out.transpose(0, 1)
    return (out, torch.stack(h_last)), records


@torch.no_grad()
def _lstm_gate_deltas(mod: nn.LSTM, x: torch.Tensor, hx, deltas, out: torch.Tensor | None = None):
    """For each layer (index, input (B, T, I), previous hidden states (B, T, H), delta (K,
    B, T, 4H), the same delta): the derivatives of the K stage-1 rows (deltas at output,
    h_n, c_n) with respect to the gate pre-activations, by the LSTM's backward equations:
    with h = o tanh(c), c = f c' + i g,
        dc = dc_next + dh o (1 - tanh(c)^2),  d(pre_i) = dc g i (1 - i),
        d(pre_f) = dc c' f (1 - f),  d(pre_g) = dc i (1 - g^2),  d(pre_o) = dh tanh(c) o (1 - o),
    dc_next = dc f, and dh of the step before = d(pre) W_hh + its own output's delta.
    ``out``, the fused kernel's output, gives the last layer's hidden states: its gates are
    then one matmul for all steps, and only c is carried step by step."""
    dtype = mod.weight_ih_l0.dtype
    x = x.to(dtype)
    if not mod.batch_first:
        x = x.transpose(0, 1)
        out = None if out is None else out.transpose(0, 1)
    b, t_len, _ = x.shape
    h_size, layers = mod.hidden_size, mod.num_layers
    if hx is None:
        zeros = x.new_zeros(layers, b, h_size)
        hx = (zeros, zeros)
    h0, c0 = (h.to(dtype) for h in hx)
    saved, layer_in = [], x  # layer_in (B, T, I); the rest time-major (T, B, .)
    for layer in range(layers):  # forward: keep what the backward equations read
        w_ih, w_hh, b_ih, b_hh = _weights(mod, layer, True)
        gx = F.linear(layer_in.transpose(0, 1), w_ih, b_ih + b_hh if b_ih is not None else None)
        gx = gx.contiguous()  # (T, B, 4H)
        c_all = gx.new_empty(t_len, b, h_size)
        if layer == layers - 1 and out is not None:
            hs = out.transpose(0, 1).to(dtype)
            prev = torch.cat([h0[layer].unsqueeze(0), hs[:-1]])
            acts = torch.addmm(gx.view(-1, 4 * h_size), prev.reshape(-1, h_size), w_hh.t())
            acts = acts.view(t_len, b, 4 * h_size)
            g_pre = acts[..., 2 * h_size:3 * h_size].clone()
            acts.sigmoid_()
            acts[..., 2 * h_size:3 * h_size] = g_pre.tanh_()
            i, f, gg, o = acts.chunk(4, dim=2)
            ig = i * gg
            c = c0[layer]
            for step in range(t_len):  # c = f c' + i g: the only recurrence left
                c = torch.addcmul(ig[step], f[step], c, out=c_all[step])
            h_last = hs[-1]
        else:
            w_hh_t = w_hh.t()
            h, c = h0[layer], c0[layer]
            acts = gx.new_empty(t_len, b, 4 * h_size)
            prev = gx.new_empty(t_len, b, h_size)
            for step in range(t_len):
                prev[step] = h
                g = torch.addmm(gx[step], h, w_hh_t)
                a = acts[step]
                torch.sigmoid(g, out=a)
                torch.tanh(g[:, 2 * h_size:3 * h_size], out=a[:, 2 * h_size:3 * h_size])
                i, f, gg, o = a.chunk(4, dim=1)
                c = torch.addcmul(f * c, i, gg, out=c_all[step])
                h = o * c.tanh()
            h_last = h
        c_prev = torch.cat([c0[layer].unsqueeze(0), c_all[:-1]])
        saved.append((layer_in, prev, acts, c_prev, c_all.tanh_()))
        layer_in = torch.cat([prev[1:], h_last.unsqueeze(0)]).transpose(0, 1)
    d_out, d_hn, d_cn = (d.to(dtype) for d in deltas)
    k = d_out.shape[0]
    if mod.batch_first:
        d_out = d_out.transpose(1, 2)
    d_rows = d_out.transpose(0, 1).contiguous()  # (T, K, B, H): this layer's output delta
    found = []
    for layer in reversed(range(layers)):
        w_ih, w_hh = _weights(mod, layer, True)[:2]
        layer_in, prev, acts, c_prev, tanh_c = saved[layer]
        i, f, gg, o = acts.chunk(4, dim=2)
        # the step's factors, for every step at once
        ifg = torch.cat([gg * i * (1 - i), c_prev * f * (1 - f), i * (1 - gg * gg)], 2)
        do_f = tanh_c * o * (1 - o)
        dc_f = o * (1 - tanh_c * tanh_c)
        delta = x.new_empty(t_len, k, b, 4 * h_size)
        dh = d_rows[-1] + d_hn[:, layer]
        dc_next = d_cn[:, layer]
        for step in reversed(range(t_len)):
            dc = torch.addcmul(dc_next, dh, dc_f[step])
            dl = delta[step]
            torch.mul(dc.unsqueeze(2), ifg[step].view(b, 3, h_size),
                      out=dl[..., :3 * h_size].view(k, b, 3, h_size))
            torch.mul(dh, do_f[step], out=dl[..., 3 * h_size:])
            dc_next = dc * f[step]
            if step:
                dh = torch.addmm(d_rows[step - 1].view(k * b, h_size),
                                 dl.view(k * b, 4 * h_size), w_hh).view(k, b, h_size)
        batch_major = delta.permute(1, 2, 0, 3)  # (K, B, T, 4H)
        found.append((layer, layer_in, prev.transpose(0, 1), batch_major, batch_major))
        if layer:
            d_rows = delta @ w_ih  # the delta at the output of the layer below
    return found[::-1]
