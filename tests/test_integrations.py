"""The framework callbacks with the real frameworks: a plain Lightning Trainer and a plain
Hugging Face Trainer, small models on learnable tasks, CPU, seconds each."""

import hashlib
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sensprune import SensitivityRegularizer, sensitivity, sparsity_report

ROOT = Path(__file__).resolve().parents[1]


def zeros_fraction(model):
    r = sparsity_report(model)
    return 1 - r["nonzero_params"] / r["total_params"]


def test_observe_accumulate_is_s_of_the_whole_batch():
    """Gradient accumulation: the micro-batches' S, weighted by size, is S of the whole batch."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x, t = torch.randn(10, 6), torch.randint(0, 3, (10,))
    reg = SensitivityRegularizer(m, lam=0.1, decay_floor=0.0)
    for part in (slice(0, 4), slice(4, 10)):
        with reg.observe(t[part], accumulate=True):
            m(x[part])
    w0 = {n: p.detach().clone() for n, p in reg.params.items()}
    ref = sensitivity(m, x, t, params=list(reg.params))
    reg.step()
    for n, s in ref.items():
        torch.testing.assert_close(reg.insensitivity[n], (1 - s).clamp(min=0))
        torch.testing.assert_close(reg.params[n].detach(), w0[n] * (1 - 0.1 * (1 - s).clamp(min=0)))


# -- Lightning ---------------------------------------------------------------------------------

L = pytest.importorskip("lightning")


def task(n=1200, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 20, generator=g)
    y = (x @ torch.randn(20, 4, generator=g)).argmax(1)
    return x, y


class MLP(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 4))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, i):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def lightning_trainer(tmp_path, max_epochs, callbacks, **kw):
    warnings.filterwarnings("ignore", module="lightning")
    return L.Trainer(max_epochs=max_epochs, callbacks=callbacks, logger=False,
                     enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                     default_root_dir=str(tmp_path), **kw)


@pytest.mark.e2e
def test_lightning_callback_prunes_to_target_learns_and_resumes(tmp_path):
    from sensprune.integrations.lightning import SensitivityPruning
    torch.manual_seed(0)
    x, y = task()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=50,
                                         shuffle=True)
    model = MLP()
    # the schedule ends at epoch 4 of 6: two epochs of fine-tuning with the masks held
    cb = SensitivityPruning(lam=1e-3, target=0.9, end=4)
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    lightning_trainer(tmp_path, 6, [cb, ckpt]).fit(model, loader)
    assert zeros_fraction(model) == pytest.approx(0.9, abs=0.002)
    accuracy = float((model(x).argmax(1) == y).float().mean())
    assert accuracy > 0.6, accuracy  # chance is 0.25
    assert cb.regularizer.steps == 4 * 24  # one decay per optimizer step, in the window

    state = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert set(state["state_dict"]) == {"net.0.weight", "net.0.bias", "net.2.weight",
                                        "net.2.bias"}  # plain names: no weight_orig/_mask
    zero = {n: p.detach() == 0 for n, p in model.named_parameters() if n.endswith("weight")}

    resumed = MLP()
    cb2 = SensitivityPruning(lam=1e-3, target=0.9, end=4)
    lightning_trainer(tmp_path / "r", 9, [cb2]).fit(resumed, loader,
                                                    ckpt_path=str(tmp_path / "last.ckpt"))
    for n, p in resumed.named_parameters():
        if n in zero:
            assert bool((p.detach()[zero[n]] == 0).all()), n
    assert zeros_fraction(resumed) == pytest.approx(0.9, abs=0.002)
    assert all(torch.equal(cb2.pruner.masks[n], ~zero[n]) for n in zero)


@pytest.mark.e2e
def test_lightning_gradient_accumulation_steps_once_per_optimizer_step(tmp_path):
    from sensprune.integrations.lightning import SensitivityPruning
    x, y = task(400)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=50)
    cb = SensitivityPruning(lam=1e-3, target=0.5)
    lightning_trainer(tmp_path, 2, [cb], accumulate_grad_batches=4).fit(MLP(), loader)
    assert cb.regularizer.steps == 2 * 2  # 8 batches per epoch, 4 per optimizer step
    assert zeros_fraction(cb.core.model) == pytest.approx(0.5, abs=0.002)


@pytest.mark.e2e
def test_lightning_ddp_two_processes_hold_the_same_masks_and_s(tmp_path):
    script = ROOT / "tests" / "lightning_ddp_job.py"
    r = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True,
                       text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1)]
    assert ranks[0]["masks"] == ranks[1]["masks"]
    assert ranks[0]["insensitivity"] == ranks[1]["insensitivity"]
    assert ranks[0]["zeros"] == pytest.approx(0.8, abs=0.002)


def test_lightning_refuses_sharded_strategies():
    from sensprune.errors import ConfigError
    from sensprune.integrations.lightning import SensitivityPruning

    class FSDPStrategy:  # stands for lightning's: the callback reads the strategy's type name
        pass

    class FakeTrainer:
        strategy = FSDPStrategy()

    with pytest.raises(ConfigError, match="FSDPStrategy.*strategy='ddp'"):
        SensitivityPruning(lam=1e-3, target=0.5).setup(FakeTrainer(), None, "fit")


# -- Hugging Face Trainer ----------------------------------------------------------------------

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")


class CountTask(torch.utils.data.Dataset):
    """Label 1 when most tokens are from the vocabulary's upper half."""

    def __init__(self, n, vocab=100, length=12, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, vocab, (n, length), generator=g)
        self.labels = ((self.ids >= vocab // 2).sum(1) > length // 2).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def small_bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64,
                                  max_position_embeddings=12, num_labels=2)
    return transformers.BertForSequenceClassification(cfg)


def hf_args(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=16, learning_rate=1e-3,
                report_to=[], logging_strategy="no", use_cpu=True, disable_tqdm=True,
                save_strategy="no")
    return transformers.TrainingArguments(**{**base, **kw})


@pytest.mark.e2e
def test_hf_trainer_callback_prunes_a_bert_classifier_and_resumes(tmp_path):
    from sensprune.integrations.transformers import SensitivityPruningCallback
    model = small_bert()
    cb = SensitivityPruningCallback(lam=1e-3, target=0.8, every=10)
    args = hf_args(tmp_path, max_steps=60, save_strategy="steps", save_steps=30)
    result = transformers.Trainer(model=model, args=args, train_dataset=CountTask(960),
                                  callbacks=[cb]).train()
    assert zeros_fraction(model) == pytest.approx(0.8, abs=0.002)
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert cb.regularizer.steps == 60

    # resume from the step-30 checkpoint: its zeros are kept, the schedule goes on to 80%
    resumed = small_bert()
    cb2 = SensitivityPruningCallback(lam=1e-3, target=0.8, every=10)
    trainer = transformers.Trainer(model=resumed, args=hf_args(tmp_path / "r", max_steps=60),
                                   train_dataset=CountTask(960), callbacks=[cb2])
    ckpt = tmp_path / "checkpoint-30"
    from safetensors.torch import load_file
    saved = load_file(str(ckpt / "model.safetensors"))
    trainer.train(resume_from_checkpoint=str(ckpt))
    for n, p in resumed.named_parameters():
        if n in cb2.pruner.masks and n in saved:
            assert bool((p.detach()[saved[n] == 0] == 0).all()), n
    assert zeros_fraction(resumed) == pytest.approx(0.8, abs=0.002)


@pytest.mark.e2e
def test_hf_trainer_gradient_accumulation_and_lm_label_shift(tmp_path):
    from sensprune.integrations.transformers import SensitivityPruningCallback
    cb = SensitivityPruningCallback(lam=1e-3, target=0.5, every=5)
    model = small_bert()
    transformers.Trainer(model=model, args=hf_args(tmp_path, max_steps=10,
                                                   gradient_accumulation_steps=2),
                         train_dataset=CountTask(320), callbacks=[cb]).train()
    assert cb.regularizer.steps == 10  # once per optimizer step, not per micro-batch
    assert zeros_fraction(model) == pytest.approx(0.5, abs=0.002)

    cfg = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16)
    lm = transformers.GPT2LMHeadModel(cfg)
    lm_cb = SensitivityPruningCallback(lam=1e-3, target=0.5)
    ids = torch.randint(0, 50, (2, 6))

    class State:
        global_step, max_steps = 0, 10

    lm_cb.on_train_begin(hf_args(tmp_path), State(), None, model=lm, optimizer=None)
    lm.train()
    lm(input_ids=ids, labels=ids)  # the Trainer's call: labels unshifted, as the loss takes them
    assert torch.equal(lm_cb.core.targets[:, :-1], ids[:, 1:])
    assert bool((lm_cb.core.targets[:, -1] == -100).all())
    assert lm_cb.regularizer.ready  # S was computed from that forward
    lm_cb.on_train_end(None, State(), None)
