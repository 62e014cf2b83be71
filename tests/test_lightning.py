"""PEFTCallback / PEFTMixin with real Trainer runs on tiny models (GPT-2, T5, BERT classifier, a plain MLP)."""

from __future__ import annotations

import csv
import glob
import logging
import os
import re
import warnings
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers import VOCAB, quiet_trainer, tiny_bert_classifier, tiny_gpt2, tiny_t5
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from omegaconf import OmegaConf
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader

from lightning_peft import (
    IA3Config,
    LoraConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    get_peft_model,
)
from lightning_peft.lightning import PEFTCallback, PEFTMixin

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]


# ---------------------------------------------------------------------------------------------
# tiny models without dropout (exact resume needs no randomness in the forward)
# ---------------------------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


NO_DROPOUT = {
    "gpt2": dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "t5": dict(dropout_rate=0.0),
    "bert": dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
}


def build(kind: str, seed: int = 0) -> nn.Module:
    """The tiny model of `kind` without dropout, in training mode (as a LightningModule holds it)."""
    builders = {"gpt2": tiny_gpt2, "t5": tiny_t5, "bert": tiny_bert_classifier}
    if kind in builders:
        return builders[kind](seed, **NO_DROPOUT[kind]).train()
    torch.manual_seed(seed)
    return MLP()


def batches(kind: str, n: int = 8, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(1, VOCAB, (10,), generator=g)
        if kind == "gpt2":
            rows.append({"input_ids": ids, "labels": ids})
        elif kind == "t5":
            rows.append({"input_ids": ids, "labels": torch.randint(1, VOCAB, (5,), generator=g)})
        elif kind == "bert":
            rows.append({"input_ids": ids, "labels": torch.randint(0, 3, (), generator=g)})
        else:
            rows.append({"x": torch.randn(8, generator=g), "y": torch.randn(4, generator=g)})
    return rows


def loader(kind: str, seed: int = 1) -> DataLoader:
    return DataLoader(batches(kind, seed=seed), batch_size=4)


def config_for(tuner: str, kind: str):
    task = {"gpt2": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM", "bert": "SEQ_CLS"}.get(kind)
    if tuner == "lora":
        targets = {"gpt2": ["c_attn"], "t5": ["q", "v"], "bert": ["query", "value"]}.get(kind, ["fc1", "fc2"])
        return LoraConfig(
            task_type=task,
            r=4,
            lora_alpha=8,
            target_modules=targets,
            modules_to_save=["head"] if kind == "mlp" else None,
        )
    if tuner == "ia3":
        if kind == "mlp":
            return IA3Config(target_modules=["fc1", "fc2"], feedforward_modules=["fc2"])
        return IA3Config(task_type=task)
    if tuner == "prompt_tuning":
        return PromptTuningConfig(task_type=task, num_virtual_tokens=4)
    if tuner == "p_tuning":
        return PromptEncoderConfig(task_type=task, num_virtual_tokens=4, encoder_hidden_size=16)
    return PrefixTuningConfig(task_type=task, num_virtual_tokens=4)


PROMPT_TUNERS = ("prompt_tuning", "p_tuning", "prefix_tuning")
TUNERS = ("lora", "ia3") + PROMPT_TUNERS


def forward_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    if "x" in batch:
        return F.mse_loss(model(batch["x"]), batch["y"])
    return model(**batch).loss


class TaskModule(pl.LightningModule):
    """An ordinary LightningModule: the model lives in `self.model` and knows nothing about PEFT."""

    def __init__(self, model: nn.Module, lr: float = 1e-2) -> None:
        super().__init__()
        self.model = model
        self.lr = lr
        self.optimizer_saw: tuple[int, int] | None = None

    def training_step(self, batch, batch_idx):
        return forward_loss(self.model, batch)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", forward_loss(self.model, batch))

    def test_step(self, batch, batch_idx):
        self.log("test_loss", forward_loss(self.model, batch))

    def configure_optimizers(self):
        params = list(self.parameters())
        self.optimizer_saw = (sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))
        return torch.optim.AdamW(params, lr=self.lr)  # all parameters: the frozen ones must stay untouched


def trainable(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


class Probe(pl.Callback):
    """Records what the merge at fit end would otherwise hide: adapter before/after, base integrity, outputs."""

    def __init__(self, base: dict[str, nn.Parameter], probe_batch: dict[str, torch.Tensor]) -> None:
        self.base = base
        self.base_values = {n: p.detach().clone() for n, p in base.items()}
        self.probe_batch = probe_batch

    def on_train_start(self, trainer, pl_module):
        self.start = trainable(pl_module)
        self.start_step = trainer.global_step
        self.optimizer_state_at_start = {k: dict(v) for k, v in trainer.optimizers[0].state.items()}

    def on_train_end(self, trainer, pl_module):
        self.end = trainable(pl_module)
        self.base_changed = [n for n, p in self.base.items() if not torch.equal(p, self.base_values[n])]
        pl_module.eval()
        with torch.no_grad():
            self.reference = model_output(pl_module.model, self.probe_batch)
        pl_module.train()


def model_output(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        if "x" in batch:
            return model(batch["x"])
        return model(**batch).logits


def make_trainer(tmp_path, callbacks, max_steps=4, **kwargs) -> pl.Trainer:
    return quiet_trainer(
        max_steps=max_steps, callbacks=callbacks, default_root_dir=str(tmp_path), num_sanity_val_steps=0, **kwargs
    )


def ckpt_state(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


CASES = [(k, t) for k in ("gpt2", "t5", "bert", "mlp") for t in TUNERS if not (k == "mlp" and t in PROMPT_TUNERS)]


# ---------------------------------------------------------------------------------------------
# the whole life cycle, every model x every tuner: one run each (fit with checkpoints and exports, the merge
# at fit end, then trainer.test(ckpt_path="best")), shared by one test per stage
# ---------------------------------------------------------------------------------------------
def _train_merge_and_test_best(kind: str, tuner: str, tmp_path) -> SimpleNamespace:
    model = build(kind)
    run = SimpleNamespace(
        kind=kind,
        tuner=tuner,
        root=tmp_path,
        original_class=type(model),
        base=dict(model.named_parameters()),
        probe_batch=next(iter(DataLoader(batches(kind, seed=7), batch_size=4))),
    )
    run.probe = Probe(run.base, run.probe_batch)
    run.module = TaskModule(model)
    run.best = ModelCheckpoint(dirpath=tmp_path / "best", monitor="val_loss", mode="min", save_top_k=1)
    run.weights = ModelCheckpoint(dirpath=tmp_path / "weights", save_weights_only=True, every_n_train_steps=4)
    run.last = ModelCheckpoint(dirpath=tmp_path / "last", save_last=True, save_top_k=0, every_n_train_steps=1000)
    # export="last": the exports are compared with the model at the end of training (best: tests/test_lightning_v2.py)
    run.callback = PEFTCallback(config_for(tuner, kind), export_dir=str(tmp_path / "export"), export="last")
    run.trainer = make_trainer(
        tmp_path, [run.callback, run.probe, run.best, run.weights, run.last], val_check_interval=1, limit_val_batches=1
    )
    run.trainer.fit(run.module, loader(kind), loader(kind, seed=2))
    run.adapter_keys = set(run.probe.start)
    # trainer.test(ckpt_path="best") below restores the checkpoint callbacks' states of that checkpoint: their
    # paths as they are now
    run.weights_path = run.weights.best_model_path or glob.glob(str(tmp_path / "weights" / "*.ckpt"))[0]
    run.best_path, run.last_path = run.best.best_model_path, run.last.last_model_path
    # the module after fit (never merged in place), as it stood before trainer.test() below put the best adapter on
    merged = run.module.model
    run.after_fit = SimpleNamespace(
        model_class=type(merged),
        parameter_names=[n for n, _ in merged.named_parameters()],
        output=model_output(merged, run.probe_batch),
        module_state_keys=set(run.module.state_dict()),
    )
    run.best_state = ckpt_state(run.best_path)["state_dict"]
    run.test_result = run.trainer.test(run.module, loader(kind, seed=3), ckpt_path="best", verbose=False)
    return run


@pytest.fixture(scope="module")
def lifecycle(tmp_path_factory):
    """lifecycle(kind, tuner): the run of that case, trained on first use (each stage test of a case shares it)."""
    runs: dict[tuple[str, str], SimpleNamespace] = {}

    def get(kind: str, tuner: str) -> SimpleNamespace:
        if (kind, tuner) not in runs:
            runs[kind, tuner] = _train_merge_and_test_best(kind, tuner, tmp_path_factory.mktemp(f"{kind}-{tuner}"))
        return runs[kind, tuner]

    return get


@pytest.mark.parametrize("kind,tuner", CASES)
def test_fit_trains_every_adapter_tensor_over_a_frozen_base(lifecycle, kind, tuner):
    run = lifecycle(kind, tuner)
    assert run.trainer.global_step == 4
    # injected before configure_optimizers: the optimizer saw a frozen base
    n_adapter = sum(t.numel() for t in run.probe.start.values())
    saw = run.module.optimizer_saw
    assert saw == (n_adapter, saw[1]) and saw[1] > 2 * n_adapter
    # base bit-identical, every adapter tensor trained
    assert run.probe.base_changed == []
    assert sorted(n for n in run.probe.start if torch.equal(run.probe.start[n], run.probe.end[n])) == []


@pytest.mark.parametrize("kind,tuner", CASES)
def test_checkpoints_hold_exactly_the_trainable_tensors(lifecycle, kind, tuner):
    run = lifecycle(kind, tuner)
    weights_ckpt = ckpt_state(run.weights_path)
    assert set(weights_ckpt["state_dict"]) == run.adapter_keys
    assert "optimizer_states" not in weights_ckpt
    full_ckpt = ckpt_state(run.best_path)
    assert set(full_ckpt["state_dict"]) == run.adapter_keys and len(full_ckpt["optimizer_states"]) == 1
    size = os.path.getsize(glob.glob(str(run.root / "weights" / "*.ckpt"))[0])
    adapter_bytes = tensor_bytes(run.probe.start.values())
    base_bytes = tensor_bytes(run.base.values())
    assert adapter_bytes < size < adapter_bytes + 10_000 + 1000 * len(run.adapter_keys), (size, adapter_bytes)
    assert kind == "mlp" or size < base_bytes / 2  # the MLP base is smaller than the pickle overhead
    # last.ckpt is written by ModelCheckpoint.on_train_end, before the merge: the final adapter
    last_ckpt = ckpt_state(run.last_path)
    assert set(last_ckpt["state_dict"]) == run.adapter_keys
    assert all(torch.equal(last_ckpt["state_dict"][k], run.probe.end[k]) for k in run.adapter_keys)


# the checkpoint's state_dict written out: GPT-2 (2 layers, n_embd 32, c_attn 32 -> 96, mlp 128), LoRA r=4 on
# c_attn, IA3 with the CAUSAL_LM defaults (c_attn, mlp.c_proj), prompt learning with 4 virtual tokens
# (P-tuning's MLP encoder: 32 -> 16 -> 16 -> 32); the MLP with LoRA on fc1, fc2 and its head saved whole
CHECKPOINT_KEYS = {
    ("gpt2", "lora"): {
        "model.base_model.model.transformer.h.0.attn.c_attn.lora_A.default.weight": (4, 32),
        "model.base_model.model.transformer.h.0.attn.c_attn.lora_B.default.weight": (96, 4),
        "model.base_model.model.transformer.h.1.attn.c_attn.lora_A.default.weight": (4, 32),
        "model.base_model.model.transformer.h.1.attn.c_attn.lora_B.default.weight": (96, 4),
    },
    ("gpt2", "ia3"): {
        "model.base_model.model.transformer.h.0.attn.c_attn.ia3_l.default": (96, 1),
        "model.base_model.model.transformer.h.0.mlp.c_proj.ia3_l.default": (1, 128),
        "model.base_model.model.transformer.h.1.attn.c_attn.ia3_l.default": (96, 1),
        "model.base_model.model.transformer.h.1.mlp.c_proj.ia3_l.default": (1, 128),
    },
    ("gpt2", "prompt_tuning"): {
        "model.prompt_encoder.default.embedding.weight": (4, 32),
    },
    ("gpt2", "p_tuning"): {
        "model.prompt_encoder.default.embedding.weight": (4, 32),
        "model.prompt_encoder.default.mlp_head.0.weight": (16, 32),
        "model.prompt_encoder.default.mlp_head.0.bias": (16,),
        "model.prompt_encoder.default.mlp_head.2.weight": (16, 16),
        "model.prompt_encoder.default.mlp_head.2.bias": (16,),
        "model.prompt_encoder.default.mlp_head.4.weight": (32, 16),
        "model.prompt_encoder.default.mlp_head.4.bias": (32,),
    },
    ("gpt2", "prefix_tuning"): {
        "model.prompt_encoder.default.embedding.weight": (4, 128),  # 2 layers x (k, v) x 32
    },
    ("mlp", "lora"): {
        "model.base_model.model.fc1.lora_A.default.weight": (4, 8),
        "model.base_model.model.fc1.lora_B.default.weight": (16, 4),
        "model.base_model.model.fc2.lora_A.default.weight": (4, 16),
        "model.base_model.model.fc2.lora_B.default.weight": (16, 4),
        "model.base_model.model.head.modules_to_save.default.weight": (4, 16),
        "model.base_model.model.head.modules_to_save.default.bias": (4,),
    },
}


@pytest.mark.parametrize("kind,tuner", list(CHECKPOINT_KEYS))
def test_checkpoint_state_dict_keys_are_exactly(lifecycle, kind, tuner):
    run = lifecycle(kind, tuner)
    state = ckpt_state(run.last_path)["state_dict"]
    assert {k: tuple(v.shape) for k, v in state.items()} == CHECKPOINT_KEYS[kind, tuner]


@pytest.mark.parametrize("kind,tuner", CASES)
def test_exported_adapter_reproduces_the_trained_model_on_a_fresh_base(lifecycle, kind, tuner):
    run = lifecycle(kind, tuner)
    adapter_dir = run.root / "export" / "adapter"
    assert run.callback.adapter_dir == str(adapter_dir)
    assert sorted(os.listdir(adapter_dir)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    reloaded = PeftModel.from_pretrained(build(kind), str(adapter_dir))
    torch.testing.assert_close(model_output(reloaded, run.probe_batch), run.probe.reference, rtol=0, atol=1e-5)
    assert not [p for p in os.listdir(run.root / "export") if p.startswith(".")]  # no temporary folders left


@pytest.mark.parametrize("kind,tuner", CASES)
def test_merge_at_fit_end_and_merged_export(lifecycle, kind, tuner):
    run = lifecycle(kind, tuner)
    after_fit, merged_dir = run.after_fit, run.root / "export" / "merged"
    # the module keeps its adapter after fit (not merged in place): an adapter-only state dict, the trained outputs
    assert issubclass(after_fit.model_class, PeftModel)
    assert after_fit.module_state_keys == run.adapter_keys
    torch.testing.assert_close(after_fit.output, run.probe.reference, rtol=0, atol=1e-5)
    if tuner in PROMPT_TUNERS:  # nothing to merge: no merged export
        assert not merged_dir.exists()
        return
    if kind == "mlp":
        fresh = MLP()
        fresh.load_state_dict(load_file(str(merged_dir / "model.safetensors")))
    else:
        fresh = run.original_class.from_pretrained(str(merged_dir))
    torch.testing.assert_close(model_output(fresh, run.probe_batch), run.probe.reference, rtol=0, atol=1e-5)
    merged = run.callback.merged_model  # the same merged model on request
    assert type(merged) is run.original_class
    assert not any("lora_" in n or "ia3_" in n or "modules_to_save" in n for n, _ in merged.named_parameters())


@pytest.mark.parametrize("kind,tuner", CASES)
def test_test_with_best_checkpoint_after_the_merge_uses_the_best_adapter_on_the_untouched_base(lifecycle, kind, tuner):
    run = lifecycle(kind, tuner)
    module = run.module
    assert isinstance(module.model, PeftModel)
    now_base = {
        n.replace(".base_layer", "").replace(".original_module", ""): p
        for n, p in module.model.get_base_model().named_parameters()
    }  # base weights under their wrappers
    assert set(run.probe.base_values) <= set(now_base)
    assert all(torch.equal(now_base[n], v) for n, v in run.probe.base_values.items())
    now = {n: p for n, p in module.named_parameters() if n in run.adapter_keys}
    assert set(now) == run.adapter_keys and all(torch.equal(now[k], run.best_state[k]) for k in run.adapter_keys)
    expected_model = get_peft_model(build(kind), config_for(tuner, kind))
    missing, unexpected = expected_model.load_state_dict(
        {k[len("model.") :]: v for k, v in run.best_state.items()}, strict=False
    )
    assert unexpected == []
    expected_model.eval()
    with torch.no_grad():
        expected = torch.stack([forward_loss(expected_model, b) for b in loader(kind, seed=3)]).mean()
    assert abs(run.test_result[0]["test_loss"] - expected.item()) < 1e-5


# ---------------------------------------------------------------------------------------------
# resume
# ---------------------------------------------------------------------------------------------
RESUME_CASES = [("gpt2", t) for t in TUNERS] + [("mlp", "lora"), ("mlp", "ia3")]


def _optimizer_tensors(trainer: pl.Trainer) -> list[torch.Tensor]:
    out = []
    for state in trainer.optimizers[0].state_dict()["state"].values():
        out += [state["exp_avg"], state["exp_avg_sq"], torch.as_tensor(state["step"])]
    return out


def _resume_run(kind: str, tuner: str, root, max_epochs: int, ckpt_path=None, extra=()):
    module = TaskModule(build(kind))
    probe = Probe(dict(module.model.named_parameters()), next(iter(loader(kind))))
    trainer = make_trainer(
        root,
        [PEFTCallback(config_for(tuner, kind), merge_on_train_end=False), probe, *extra],
        max_steps=-1,
        max_epochs=max_epochs,
    )
    trainer.fit(module, loader(kind), ckpt_path=ckpt_path)
    return module, trainer, probe


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """interrupted(kind, tuner): a straight 3-epoch run and a 2-epoch one that saved a full and a weights-only
    checkpoint at its end (step 4), made on first use and shared by the resume tests of that case."""
    runs: dict[tuple[str, str], SimpleNamespace] = {}

    def get(kind: str, tuner: str) -> SimpleNamespace:
        if (kind, tuner) not in runs:
            root = tmp_path_factory.mktemp(f"resume-{kind}-{tuner}")
            straight, straight_trainer, _ = _resume_run(kind, tuner, root, 3)  # 2 batches per epoch: 6 steps
            full = ModelCheckpoint(dirpath=root / "full", every_n_epochs=1, save_on_train_epoch_end=True, save_top_k=-1)
            weights = ModelCheckpoint(
                dirpath=root / "weights",
                every_n_epochs=2,
                save_on_train_epoch_end=True,
                save_top_k=-1,
                save_weights_only=True,
            )
            first, _, _ = _resume_run(kind, tuner, root, 2, extra=(full, weights))
            runs[kind, tuner] = SimpleNamespace(
                straight=trainable(straight),
                straight_optimizer=_optimizer_tensors(straight_trainer),
                first=trainable(first),
                full_path=str(root / "full" / "epoch=1-step=4.ckpt"),
                weights_path=str(root / "weights" / "epoch=1-step=4.ckpt"),
            )
        return runs[kind, tuner]

    return get


@pytest.mark.parametrize("kind,tuner", RESUME_CASES)
def test_resume_from_a_full_checkpoint_equals_the_straight_run(interrupted, kind, tuner, tmp_path):
    runs = interrupted(kind, tuner)
    resumed, resumed_trainer, probe = _resume_run(kind, tuner, tmp_path, 3, ckpt_path=runs.full_path)
    assert (probe.start_step, resumed_trainer.global_step) == (4, 6)
    assert probe.base_changed == []
    assert all(torch.equal(probe.start[k], v) for k, v in runs.first.items())
    expected = runs.straight
    assert all(torch.equal(v, expected[k]) for k, v in trainable(resumed).items()) and len(expected) > 0
    assert all(torch.equal(a, b) for a, b in zip(_optimizer_tensors(resumed_trainer), runs.straight_optimizer))


@pytest.mark.parametrize("kind,tuner", RESUME_CASES)
def test_resume_from_a_weights_only_checkpoint_warns_and_starts_a_fresh_optimizer(interrupted, kind, tuner, tmp_path):
    runs = interrupted(kind, tuner)
    with pytest.warns(UserWarning, match="resuming from a weights-only checkpoint"):
        from_weights, weights_trainer, probe = _resume_run(kind, tuner, tmp_path, 3, ckpt_path=runs.weights_path)
    assert (probe.start_step, weights_trainer.global_step) == (4, 6)
    assert probe.optimizer_state_at_start == {}  # fresh optimizer
    assert all(torch.equal(probe.start[k], v) for k, v in runs.first.items())
    assert probe.base_changed == []
    expected = runs.straight
    assert not all(torch.equal(v, expected[k]) for k, v in trainable(from_weights).items())  # fresh Adam moments


@pytest.mark.parametrize("kind,tuner", RESUME_CASES)
def test_resume_from_a_checkpoint_missing_one_adapter_tensor_is_refused(interrupted, kind, tuner, tmp_path):
    """... before anything is loaded."""
    runs = interrupted(kind, tuner)
    bad = ckpt_state(runs.full_path)
    dropped = sorted(bad["state_dict"])[-1]
    del bad["state_dict"][dropped]
    torch.save(bad, tmp_path / "bad.ckpt")
    n = len(runs.straight)
    with pytest.raises(ValueError, match=re.escape(f"1 of {n} adapter tensors are missing: {dropped}")):
        _resume_run(kind, tuner, tmp_path, 3, ckpt_path=str(tmp_path / "bad.ckpt"))


def test_bad_checkpoint_is_never_loaded_half(tmp_path):
    module = TaskModule(build("gpt2"))
    trainer = make_trainer(tmp_path, [PEFTCallback(config_for("lora", "gpt2"), merge_on_train_end=False)])
    trainer.validate(module, loader("gpt2"), verbose=False)  # injects
    before = trainable(module)
    state = {k: torch.full_like(v, 0.5) for k, v in before.items()}
    partial = dict(state)
    removed = sorted(partial)[0]
    del partial[removed]
    with pytest.raises(ValueError) as err:
        module.load_state_dict(partial)
    assert str(err.value) == (
        "refusing to load this state into TaskModule: it does not hold the adapter 'default' (LORA) of "
        f"`self.model` (1 of 4 adapter tensors are missing: {removed}). It was saved without the adapter or for "
        "a different tuner config / model; nothing was loaded."
    )
    assert all(torch.equal(v, before[k]) for k, v in trainable(module).items())
    wrong_rank = {k: (torch.zeros(2, v.shape[1]) if "lora_A" in k else v) for k, v in state.items()}
    with pytest.raises(
        ValueError, match=r"shape mismatches: .*lora_A.default.weight: checkpoint \(2, 32\) vs model \(4, 32\)"
    ):
        module.load_state_dict(wrong_rank)
    assert all(torch.equal(v, before[k]) for k, v in trainable(module).items())
    module.load_state_dict(state)  # complete adapter: loads, strict, though the base is absent
    assert all(torch.equal(v, state[k]) for k, v in trainable(module).items())
    with pytest.raises(RuntimeError, match="Unexpected key"):  # strict loading still catches strangers
        module.load_state_dict({**state, "model.not_a_key": torch.zeros(1)})


# ---------------------------------------------------------------------------------------------
# configuration, errors, logging
# ---------------------------------------------------------------------------------------------
def test_config_forms_are_equivalent():
    expected = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"])
    forms = [
        expected,
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["c_attn"]},
        OmegaConf.create({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["c_attn"]}),
        OmegaConf.create(
            {"_target_": "lightning_peft.LoraConfig", "r": 4, "lora_alpha": 8, "target_modules": ["c_attn"]}
        ),
    ]
    for form in forms:
        assert PEFTCallback(form).config == expected
    with pytest.raises(ValueError, match="has neither 'peft_type'"):
        PEFTCallback({"r": 4})
    with pytest.raises(TypeError, match="built a dict, not a tuner config"):
        PEFTCallback({"_target_": "builtins.dict", "r": 4})


def test_model_attr_that_does_not_exist(tmp_path):
    trainer = make_trainer(tmp_path, [PEFTCallback(config_for("lora", "gpt2"), model_attr="net")])
    with pytest.raises(AttributeError) as err:
        trainer.fit(TaskModule(build("gpt2")), loader("gpt2"))
    assert str(err.value) == (
        "PEFTCallback(model_attr='net'): TaskModule has no model in `self.net` (its child modules are: model). "
        "Keep the model in `self.net` or pass model_attr= the attribute that holds it; a model built in "
        "configure_model() must exist once configure_model() returns."
    )


def test_trainable_counts_logged_once_to_loggers_and_console(tmp_path, caplog):
    module = TaskModule(build("gpt2"))
    logger = CSVLogger(str(tmp_path), name="logs", version=0)
    trainer = make_trainer(
        tmp_path,
        [PEFTCallback(config_for("lora", "gpt2"), merge_on_train_end=False)],
        logger=logger,
        log_every_n_steps=1,
    )
    with caplog.at_level(logging.INFO):
        trainer.validate(module, loader("gpt2"), verbose=False)
        trainer.fit(module, loader("gpt2"))
        trainer.test(module, loader("gpt2"), verbose=False)
    lines = [r.getMessage() for r in caplog.records if "trainable params" in r.getMessage()]
    trainable_n, total_n = module.model.get_nb_trainable_parameters()
    assert trainable_n == 1024
    assert lines == [
        f"lightning_peft: LORA adapter 'default' on `model`: trainable params 1,024 of {total_n:,d} "
        f"({100 * 1024 / total_n:.4f}%)"
    ]
    with open(tmp_path / "logs" / "version_0" / "metrics.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("peft/trainable_params")]
    assert len(rows) == 1
    assert (float(rows[0]["peft/trainable_params"]), float(rows[0]["peft/total_params"])) == (1024.0, float(total_n))
    # the default export dir is the trainer's log dir; merge_on_train_end=False keeps the PeftModel
    assert os.path.isfile(tmp_path / "logs" / "version_0" / "adapter" / "adapter_model.safetensors")
    assert not (tmp_path / "logs" / "version_0" / "merged").exists()
    assert isinstance(module.model, PeftModel)


# ---------------------------------------------------------------------------------------------
# models built in configure_model, and the mixin
# ---------------------------------------------------------------------------------------------
class LazyMixinModule(PEFTMixin, TaskModule):
    """The FSDP way: the model does not exist until configure_model."""

    def __init__(self, kind: str) -> None:
        super().__init__(model=None)
        self.kind = kind
        self.peft_config = config_for("lora", kind)

    def configure_model(self) -> None:
        if self.model is None:
            self.model = build(self.kind)
        super().configure_model()  # last: PEFTMixin applies the tuner to the model just built


class LazyPlainModule(TaskModule):
    def __init__(self, kind: str) -> None:
        super().__init__(model=None)
        self.kind = kind

    def configure_model(self) -> None:
        if self.model is None:
            self.model = build(self.kind)


def test_mixin_with_model_built_in_configure_model(tmp_path):
    module = LazyMixinModule("gpt2")
    full = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2)
    trainer = make_trainer(tmp_path, [full], max_steps=2)
    trainer.fit(module, loader("gpt2"))
    assert isinstance(module.model, PeftModel) and module.peft_model is module.model
    keys = set(trainable(module))
    assert module.optimizer_saw[0] == 1024 and len(keys) == 4
    assert set(ckpt_state(full.best_model_path)["state_dict"]) == keys

    # HF-format state, save / load round trip
    hf_state = module.adapter_state_dict()
    assert sorted(hf_state) == sorted(
        f"base_model.model.transformer.h.{i}.attn.c_attn.lora_{ab}.weight" for i in range(2) for ab in "AB"
    )
    module.save_adapter(str(tmp_path / "adapter"))
    trained = trainable(module)
    with torch.no_grad():
        for p in module.model.parameters():
            if p.requires_grad:
                p.zero_()
    module.load_adapter(str(tmp_path / "adapter"))
    assert all(torch.equal(v, trained[k]) for k, v in trainable(module).items())
    assert set(trainable(module)) == keys  # still trainable

    # load_from_checkpoint builds the model in configure_model, applies the tuner, loads the adapter
    restored = LazyMixinModule.load_from_checkpoint(full.best_model_path, kind="gpt2")
    assert all(torch.equal(v, trained[k]) for k, v in trainable(restored).items())

    batch = next(iter(loader("gpt2")))
    reference = model_output(module.model, batch)
    merged = module.merge_and_unload()  # a merged model on request; the module keeps its adapter
    assert type(merged).__name__ == "GPT2LMHeadModel" and module.model is not merged
    assert module.peft_model is module.model and sorted(module.adapter_state_dict()) == sorted(hf_state)
    torch.testing.assert_close(model_output(merged, batch), reference, rtol=0, atol=1e-5)
    torch.testing.assert_close(model_output(module.model, batch), reference, rtol=0, atol=0)


def test_callback_with_model_built_in_configure_model(tmp_path):
    module = LazyPlainModule("bert")
    weights = ModelCheckpoint(dirpath=tmp_path / "w", every_n_train_steps=2, save_weights_only=True)
    trainer = make_trainer(
        tmp_path, [PEFTCallback(config_for("lora", "bert"), export_dir=str(tmp_path / "out")), weights], max_steps=2
    )
    trainer.fit(module, loader("bert"))
    assert "configure_model" not in module.__dict__  # the one-shot wrapper removed itself
    assert isinstance(module.model, PeftModel)  # not merged in place at the end
    keys = set(ckpt_state(weights.best_model_path)["state_dict"])
    assert keys == {
        f"model.base_model.model.bert.encoder.layer.{i}.attention.self.{m}.lora_{ab}.default.weight"
        for i in range(2)
        for m in ("query", "value")
        for ab in "AB"
    } | {
        "model.base_model.model.classifier.modules_to_save.default.weight",
        "model.base_model.model.classifier.modules_to_save.default.bias",
    }
    assert os.path.isfile(tmp_path / "out" / "merged" / "model.safetensors")


def test_mixin_config_and_callback_together_is_an_error(tmp_path):
    module = LazyMixinModule("gpt2")
    trainer = make_trainer(tmp_path, [PEFTCallback(config_for("lora", "gpt2"))])
    with pytest.raises(
        ValueError, match=r"applies a tuner to `model` itself \(PEFTMixin.peft_config\) and PEFTCallback"
    ):
        module.configure_model()  # the mixin applies its own config ...
        trainer.fit(module, loader("gpt2"))  # ... so the callback refuses


# ---------------------------------------------------------------------------------------------
# the README example runs
# ---------------------------------------------------------------------------------------------
def test_readme_example_runs(tmp_path, monkeypatch):
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8").read()
    section = readme[readme.index("## Lightning: `PEFTCallback` and `PEFTMixin`") :]
    code = re.findall(r"```python\n(.*?)```", section, flags=re.S)[0]
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(code, "README.md", "exec"), {"__name__": "__main__"})  # noqa: S102  (the README's own example)
    assert sorted(os.listdir(tmp_path / "lightning_logs" / "version_0" / "adapter")) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert os.path.isfile(tmp_path / "lightning_logs" / "version_0" / "merged" / "model.safetensors")


def test_validate_best_and_fit_again_after_fit(tmp_path):
    model = build("gpt2")
    base = dict(model.named_parameters())
    probe = Probe(base, next(iter(loader("gpt2"))))
    module = TaskModule(model)
    callback = PEFTCallback(config_for("lora", "gpt2"), export_dir=str(tmp_path / "export"))
    best = ModelCheckpoint(dirpath=tmp_path / "best", monitor="val_loss", save_top_k=1)
    trainer = make_trainer(tmp_path, [callback, probe, best], val_check_interval=1, limit_val_batches=1)
    trainer.fit(module, loader("gpt2"), loader("gpt2", seed=2))
    assert isinstance(module.model, PeftModel)  # never merged in place
    last_out = trainer.validate(module, loader("gpt2", seed=2), verbose=False)[0]["val_loss"]  # the last adapter
    assert probe.base_changed == []
    last_model = get_peft_model(build("gpt2"), config_for("lora", "gpt2"))
    last_model.load_state_dict({k[len("model.") :]: v for k, v in probe.end.items()}, strict=False)
    with torch.no_grad():
        assert last_out == pytest.approx(
            forward_loss(last_model.eval(), next(iter(loader("gpt2", seed=2)))).item(), abs=1e-5
        )
    best_state = ckpt_state(best.best_model_path)["state_dict"]
    best_out = trainer.validate(module, loader("gpt2", seed=2), ckpt_path="best", verbose=False)[0]["val_loss"]
    assert isinstance(module.model, PeftModel)
    assert all(torch.equal(p, best_state[n]) for n, p in trainable(module).items())
    assert best_out == pytest.approx(best.best_model_score.item(), abs=1e-6)
    # a ModelCheckpoint monitors val_loss: adapter/ holds the best adapter (export="best" by default)
    assert best_out == pytest.approx(final_adapter_loss(callback.adapter_dir), abs=1e-5)

    # a second fit trains on from the final adapter over the untouched base
    module2 = TaskModule(build("gpt2"))
    probe2 = Probe(dict(module2.model.named_parameters()), probe.probe_batch)  # the untouched base values
    trainer2 = make_trainer(tmp_path, [callback], max_steps=1)
    trainer2.fit(module2, loader("gpt2"))  # module2 keeps its adapter after fit (no ModelCheckpoint: export "last")
    assert [n for n, p in probe2.base.items() if not torch.equal(p, probe2.base_values[n])] == []  # not merged
    first_adapter = load_file(os.path.join(callback.adapter_dir, "adapter_model.safetensors"))
    trainer3 = make_trainer(tmp_path, [callback, probe2], max_steps=3, logger=False)
    trainer3.fit(module2, loader("gpt2"))
    assert probe2.base_changed == [] and len(probe2.start) == 4 and probe2.start_step == 0
    assert (
        sorted(
            torch.equal(v, first_adapter[k.replace("model.", "", 1).replace(".default", "")])
            for k, v in probe2.start.items()
        )
        == [True] * 4
    )  # it went on from the final adapter
    assert isinstance(module2.model, PeftModel)


def final_adapter_loss(adapter_dir: str) -> float:
    """Validation loss of the final (pre-merge) adapter, recomputed from its HF PEFT export on a fresh base."""
    peft = PeftModel.from_pretrained(build("gpt2"), adapter_dir)
    peft.eval()
    with torch.no_grad():
        return forward_loss(peft, next(iter(loader("gpt2", seed=2)))).item()  # limit_val_batches=1
