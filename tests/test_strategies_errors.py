"""Strategy construction, block discovery, clear errors, and Lightning precisions over adapters (one process)."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import quiet_trainer, tiny_bert_classifier, tiny_gpt2, tiny_llama, token_loader
from lightning.pytorch.strategies import DDPStrategy

from lightning_peft import LoraConfig, get_peft_model
from lightning_peft.lightning.strategies import (
    PeftFSDP1Strategy,
    PeftFSDP2Strategy,
    full_tensors,
    make_strategy,
    resolve_block_classes,
)


def test_fsdp1_on_cpu_says_to_use_fsdp():
    expected = (
        "the `fsdp1` strategy (FSDP1, Lightning's FSDPStrategy) runs on CUDA GPUs only; on CPU use `fsdp` "
        "(FSDP2 through ModelParallelStrategy), e.g. `strategy=fsdp` or make_strategy('fsdp')"
    )
    with pytest.raises(RuntimeError) as err:
        make_strategy("fsdp1", accelerator="cpu")
    assert str(err.value) == expected
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError) as err:
            make_strategy("fsdp1")  # accelerator auto, no GPU here
        assert str(err.value) == expected


def test_fsdp1_strategy_on_a_cpu_trainer_fails_with_the_same_message():
    import lightning.pytorch as pl

    class Lit(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Linear(2, 2)

    trainer = pl.Trainer(strategy=PeftFSDP1Strategy(), accelerator="cpu", devices=1, logger=False)
    with pytest.raises(RuntimeError, match="use `fsdp`"):
        trainer.strategy.setup_environment()


def test_named_strategies_build_lightnings_own_objects():
    ddp = make_strategy("ddp", accelerator="cpu", process_group_backend="gloo")
    assert isinstance(ddp, DDPStrategy) and ddp._ddp_kwargs.get("find_unused_parameters") is False
    fsdp = make_strategy("fsdp", accelerator="cpu", block_classes=["GPT2Block"])
    assert isinstance(fsdp, PeftFSDP2Strategy) and fsdp._save_distributed_checkpoint is False
    assert fsdp._tensor_parallel_size == 1 and fsdp.block_classes == ["GPT2Block"]
    assert make_strategy("single") == "auto"
    with pytest.raises(ValueError, match="unknown strategy 'fsdp3'; use one of: single, int8, int4, ddp, fsdp, fsdp1"):
        make_strategy("fsdp3")
    with pytest.raises(ValueError, match="use_orig_params=True"):
        PeftFSDP1Strategy(use_orig_params=False)


@pytest.mark.parametrize(
    "factory, expected",
    [
        (tiny_gpt2, {"GPT2Block"}),
        (tiny_llama, {"LlamaDecoderLayer"}),
        (tiny_bert_classifier, {"BertLayer", "BertEmbeddings"}),
    ],
)
def test_blocks_come_from_no_split_modules_after_injection(factory, expected):
    peft = get_peft_model(factory(), LoraConfig(r=2, target_modules="all-linear"))
    wrapper = torch.nn.ModuleDict({"model": peft})  # what the strategy sees: the LightningModule
    assert {c.__name__ for c in resolve_block_classes(wrapper)} >= expected
    assert {
        c.__name__
        for c in resolve_block_classes(wrapper, ["GPT2Attention"] if factory is tiny_gpt2 else [next(iter(expected))])
    } <= expected | {"GPT2Attention"}


def test_unknown_or_missing_blocks_are_explained():
    peft = get_peft_model(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    with pytest.raises(ValueError, match=r"\['NoSuchBlock'\] do not occur in PeftModel"):
        resolve_block_classes(peft, ["NoSuchBlock"])
    with pytest.raises(ValueError, match="pass block_classes="):
        resolve_block_classes(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_full_tensors_is_a_no_op_without_dtensors():
    model = torch.nn.Linear(3, 2)
    weight = model.weight
    with full_tensors(model):
        assert model.weight is weight
    assert model.weight is weight


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
def test_lightning_precisions_keep_adapters_in_fp32_and_train_them(tmp_path, precision):
    import lightning.pytorch as pl
    from safetensors.torch import load_file

    from lightning_peft.lightning import PEFTCallback

    class LitLM(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = tiny_llama()
            self.seen_dtypes = set()

        def training_step(self, batch, batch_idx):
            out = self.model(input_ids=batch[0], labels=batch[0])
            self.seen_dtypes.add(out.logits.dtype)
            return out.loss

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)

    module = LitLM()
    callback = PEFTCallback(
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
        export_dir=str(tmp_path),
        merge_on_train_end=False,
    )
    trainer = quiet_trainer(
        max_steps=3, devices=1, precision=precision, enable_checkpointing=False, callbacks=[callback]
    )
    data = token_loader()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, data)
    adapters = {n: p for n, p in module.model.named_parameters() if "lora_" in n}
    assert adapters and all(p.dtype == torch.float32 and p.requires_grad for p in adapters.values())
    # autocast ran the matmuls in bf16, while the adapter parameters stayed fp32
    assert module.seen_dtypes == ({torch.bfloat16} if precision == "bf16-mixed" else {torch.float32})
    exported = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert exported and all(v.dtype == torch.float32 for v in exported.values())
    assert any(v.abs().sum() > 0 for k, v in exported.items() if "lora_B" in k)
