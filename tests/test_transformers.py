"""Transformers as users build them: raw Hugging Face models (BERT classifier, GPT-2 LM with
tied embeddings) and nn.TransformerEncoder, S against a brute force that shares no code with
sensprune (one autograd call per sample of the selected outputs' sum)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sensprune
from sensprune import Pruner, SensitivityRegularizer, sensitivity, sparsity_report
from sensprune.errors import ConfigError
from sensprune.models import select_params

transformers = pytest.importorskip("transformers")


def bert(num_labels=3):
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=32,
                                  max_position_embeddings=32, num_labels=num_labels,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(cfg).double()


def gpt2():
    cfg = transformers.GPT2Config(vocab_size=24, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).double()


class EncoderClassifier(nn.Module):
    """Tokens -> embedding + learned positions -> nn.TransformerEncoder -> mean -> Linear."""

    def __init__(self, batch_first, vocab=30, d=16, classes=4):
        super().__init__()
        self.batch_first = batch_first
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.pos = nn.Parameter(torch.randn(12, d) * 0.1)
        layer = nn.TransformerEncoderLayer(d, 2, 32, dropout=0.0, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, tokens, padding_mask=None):
        h = self.emb(tokens) + self.pos[: tokens.shape[1]]
        if not self.batch_first:
            h = h.transpose(0, 1)
        h = self.encoder(h, src_key_padding_mask=padding_mask)
        if not self.batch_first:
            h = h.transpose(0, 1)
        return self.head(h.mean(1))


def brute_force(model, call, targets, kind, select):
    """S by definition: per sample n, the gradient of the selected outputs summed over its
    kept positions (targets -100 left out), |.|, mean over samples; all uses of a tied tensor
    summed by autograd itself."""
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    y = select(call())
    b, c = y.shape[0], y.shape[-1]
    s = {n: torch.zeros_like(p) for n, p in named.items()}
    for n in range(b):
        yn = y[n].reshape(-1, c)
        tn = targets[n].reshape(-1) if targets is not None else None
        keep = (tn != -100) if tn is not None else torch.ones(yn.shape[0], dtype=torch.bool)
        scalars = ([(yn[keep].gather(1, tn[keep].unsqueeze(1)).sum(), 1.0)] if kind == "specific"
                   else [(yn[keep, k].sum(), 1.0 / c) for k in range(c)])
        for scalar, a in scalars:
            gs = torch.autograd.grad(scalar, list(named.values()), retain_graph=True,
                                     allow_unused=True)
            for name, g in zip(named, gs):
                if g is not None:
                    s[name] += a * g.abs() / b
    return s


def assert_close_all(got, ref, tol=1e-4):
    assert set(got) == set(ref)
    for n in ref:
        scale = float(ref[n].abs().max())
        err = float((got[n].double() - ref[n].double()).abs().max())
        assert err <= tol * scale + 1e-12, (n, err, scale)  # a zero S: rounding only


def test_bert_classifier_raw_model_exact():
    m = bert().eval()
    ids = torch.randint(1, 50, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0  # padding
    t = torch.tensor([0, 2, 1])
    inputs = {"input_ids": ids, "attention_mask": mask}
    for kind in ("specific", "unspecific"):
        got = sensitivity(m, inputs, t if kind == "specific" else None, kind=kind)
        ref = brute_force(m, lambda: m(**inputs), t if kind == "specific" else None, kind,
                          lambda out: out.logits)
        assert_close_all(got, ref)


def test_gpt2_lm_tied_weights_and_ignored_positions_exact():
    m = gpt2().eval()
    assert m.lm_head.weight is m.transformer.wte.weight  # tied
    ids = torch.randint(0, 24, (3, 6))
    targets = torch.cat([ids[:, 1:], torch.full((3, 1), -100)], 1)  # next token
    targets[2, :2] = -100
    for kind in ("specific", "unspecific"):
        got = sensitivity(m, {"input_ids": ids}, targets, kind=kind)
        ref = brute_force(m, lambda: m(input_ids=ids), targets, kind, lambda out: out.logits)
        assert_close_all(got, ref)


@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_encoder_exact(batch_first):
    torch.manual_seed(0)
    m = EncoderClassifier(batch_first).double().train()  # dropout 0: training mode is exact
    tokens = torch.randint(1, 30, (4, 5))
    tokens[3, 3:] = 0
    pad = tokens == 0
    t = torch.tensor([0, 3, 1, 2])
    got = sensitivity(m, (tokens, pad), t)
    ref = brute_force(m, lambda: m(tokens, pad), t, "specific", lambda out: out)
    assert_close_all(got, ref)
    assert "encoder.layers.0.self_attn.in_proj_weight" in select_params(m)


def test_outputs_as_models_return_them():
    m = bert().eval()
    ids = torch.randint(1, 50, (2, 5))
    t = torch.tensor([1, 0])
    ref = sensitivity(m, {"input_ids": ids}, t)
    for fmt in (lambda y: (y,), lambda y: {"logits": y}, lambda y: [y, y]):
        got = sensitivity(_Wrap(m, fmt), ids, t)
        for n in ref:
            torch.testing.assert_close(got["m." + n], ref[n])
    with pytest.raises(ConfigError, match="without 'logits'"):
        sensitivity(_Wrap(m, lambda y: {"h": y}), ids, t)
    got = sensitivity(_Wrap(m, lambda y: {"h": y}), ids, t, output=lambda o: o["h"])
    torch.testing.assert_close(got["m.classifier.weight"], ref["classifier.weight"])


class _Wrap(nn.Module):
    """The BERT classifier returning its logits in another container."""

    def __init__(self, m, fmt):
        super().__init__()
        self.m, self.fmt = m, fmt

    def forward(self, ids):
        return self.fmt(self.m(input_ids=ids).logits)


def test_regularizer_observe_raw_hf_model_with_own_loss_and_adamw():
    """The user's loop on the raw model: observe, the model's own loss, AdamW, reg.step(),
    pruner.apply(); pruned weights stay zero."""
    m = bert().float().train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    reg = SensitivityRegularizer(m, lam=1e-2, decay_floor=0.0)
    pruner = Pruner(m, optimizer=opt)
    ids, t = torch.randint(1, 50, (4, 6)), torch.tensor([0, 1, 2, 0])
    pruner.prune_to(0.5)
    zero = {n: p.detach() == 0 for n, p in pruner.params.items()}
    for _ in range(3):
        opt.zero_grad()
        with reg.observe(t):
            out = m(input_ids=ids, labels=t)
        out.loss.backward()
        opt.step()
        reg.step()
        pruner.apply()
    ref = sensitivity(m, {"input_ids": ids}, t, params=list(reg.params))  # S exists, is sane
    assert set(reg.insensitivity) == set(ref)
    for n, p in pruner.params.items():
        assert bool((p.detach()[zero[n]] == 0).all()), n


def test_tied_weights_pruner_regularizer_and_report_see_one_tensor():
    m = gpt2().float()
    names = list(select_params(m))
    assert "transformer.wte.weight" in names and "lm_head.weight" not in names
    assert "transformer.wpe.weight" not in names  # position table: not pruned by default
    assert "transformer.wpe.weight" in select_params(m, "weights+embeddings")
    pruner = Pruner(m)
    pruner.prune_to(0.5)  # never raises for a tie
    rep = sparsity_report(m)
    total = sum(p.numel() for p in select_params(m).values())
    assert rep["total_params"] == total
    assert rep["compression_ratio"] == pytest.approx(2.0, rel=1e-3)
    reg = SensitivityRegularizer(m, lam=1e-3)
    ids = torch.randint(0, 24, (2, 5))
    targets = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], 1)
    with reg.observe(targets):
        out = m(input_ids=ids)
    F.cross_entropy(out.logits.flatten(0, 1), targets.flatten(), ignore_index=-100).backward()
    reg.step()
    assert "transformer.wte.weight" in reg.insensitivity


def test_weight_read_outside_its_layer_goes_to_the_exact_path():
    """A tied weight also read through F.linear (no layer call the engines see): the graph
    shows the extra use, so S stays exact."""

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 8)
            self.mix = nn.Linear(8, 8)

        def forward(self, ids):
            return F.linear(torch.tanh(self.mix(self.emb(ids))), self.emb.weight)

    torch.manual_seed(0)
    m = LM().double()
    ids = torch.randint(0, 20, (3, 4))
    t = torch.randint(0, 20, (3, 4))
    got = sensitivity(m, ids, t)
    ref = brute_force(m, lambda: m(ids), t, "specific", lambda out: out)
    assert_close_all(got, ref)


def test_sequence_targets_are_checked():
    m = gpt2().float()
    ids = torch.randint(0, 24, (2, 5))
    with pytest.raises(ConfigError, match=r"shape \(2, 5\)"):
        sensitivity(m, {"input_ids": ids}, ids[:, 0])
    with pytest.raises(ConfigError, match="out of range.*-100"):
        sensitivity(m, {"input_ids": ids}, torch.full((2, 5), 24))


def test_every_layer_of_the_three_models_takes_an_engine():
    """The exactness tests above check the fast path, not the generic fallback: every
    parameter is on an engine except the position tables, which are looked up once for the
    whole batch (no per-sample derivative to read) and a raw nn.Parameter."""
    from sensprune import coverage
    ids = torch.randint(1, 24, (3, 6))
    lm_t = torch.cat([ids[:, 1:], torch.full((3, 1), -100)], 1)
    cases = [(bert(), {"input_ids": ids}, torch.tensor([0, 1, 2]),
              {"bert.embeddings.position_embeddings.weight"}),
             (gpt2(), {"input_ids": ids}, lm_t, {"transformer.wpe.weight"}),
             (EncoderClassifier(True).train(), (ids, ids == 0), torch.tensor([0, 1, 2]), {"pos"}),
             (EncoderClassifier(False).train(), (ids, ids == 0), torch.tensor([0, 1, 2]), {"pos"})]
    for m, inputs, t, generic in cases:
        paths = coverage(m, inputs, t)
        assert {n for n, p in paths.items() if p == "generic"} == generic
        assert len(paths) == sum(1 for p in m.parameters() if p.requires_grad)
