"""QLoRA: a bitsandbytes 4-bit base (NF4 / FP4, double quantization) under LoRA and IA3, against HF PEFT on the
same 4-bit weights (HF's users quantize with transformers' `BitsAndBytesConfig`, which runs on CPU here)."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from helpers import ids, perturb, quiet, snapshot, tiny_gpt2, tiny_llama, unchanged

bnb = pytest.importorskip("bitsandbytes")
import peft as hf  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

import lightning_peft as lp  # noqa: E402
from lightning_peft import quantization as q  # noqa: E402
from lightning_peft.tuners.lora import Linear4bit as LoraLinear4bit  # noqa: E402

# in_features >= 64 (bitsandbytes' block size): its CPU inference repacking needs whole blocks
SIZES = {"hidden_size": 64, "intermediate_size": 128}
TARGETS = ["q_proj", "v_proj", "down_proj"]


def bnb_config(quant_type: str, double_quant: bool) -> BitsAndBytesConfig:
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.float32,
    )


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama64")
    tiny_llama(**SIZES).save_pretrained(folder)
    return folder


def hf_4bit(folder, quant_type="nf4", double_quant=True):
    """The HF user's way: transformers loads the fp32 checkpoint straight into bitsandbytes 4-bit layers."""
    return quiet(
        AutoModelForCausalLM.from_pretrained,
        folder,
        quantization_config=bnb_config(quant_type, double_quant),
        device_map="cpu",
    ).eval()


def ours_4bit(quant_type="nf4", double_quant=True, **kw):
    return q.quantize_base_linears(
        tiny_llama(**SIZES), bits=4, quant_type=quant_type, double_quant=double_quant, **kw
    ).eval()


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def exact_logits(model, x):
    """In training mode (no dropout in these models and configs) bitsandbytes runs its fp32 path; in eval mode on an
    AVX512-BF16 CPU it repacks the weight for a bf16 kernel on the first forward, and again (not identically) after a
    `state_dict()` call unpacked it: equal models can then differ by ~1e-3."""
    mode = model.training
    try:
        return logits(model.train(), x)
    finally:
        model.train(mode)


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)])
def test_same_4bit_weights_as_transformers_bitsandbytes_config(llama_dir, quant_type, double_quant):
    ours, theirs = ours_4bit(quant_type, double_quant), hf_4bit(llama_dir, quant_type, double_quant)
    assert len(q.int4_layers(ours)) == 14 and q.int4_layers(ours) == q.int4_layers(theirs)
    layer = ours.model.layers[0].self_attn.q_proj
    assert (layer.weight.quant_type, layer.weight.compress_statistics, layer.compute_dtype) == (
        quant_type,
        double_quant,
        torch.float32,
    )
    mine, hfs = ours.state_dict(), theirs.state_dict()
    assert mine.keys() == hfs.keys()
    for key in mine:
        assert torch.equal(mine[key], hfs[key]), key
    assert type(ours.lm_head) is torch.nn.Linear  # the head stays in full precision


@pytest.mark.parity("LORA")
def test_lora_over_4bit_files_both_ways_equal_hf(llama_dir, tmp_path):
    x = ids(length=10)
    # (a) HF builds LoRA over its 4-bit model and saves; ours loads it onto our 4-bit base
    torch.manual_seed(0)
    theirs = hf.get_peft_model(hf_4bit(llama_dir), hf.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)).eval()
    perturb(theirs)
    theirs.save_pretrained(tmp_path / "hf")
    ours = lp.PeftModel.from_pretrained(ours_4bit(), tmp_path / "hf").eval()
    assert isinstance(ours.base_model.model.model.layers[0].self_attn.q_proj, LoraLinear4bit)
    reference = exact_logits(theirs, x)
    torch.testing.assert_close(exact_logits(ours, x), reference, rtol=0, atol=0)
    # ours keeps bitsandbytes' plain CPU layout in eval mode too (its bf16 repacking breaks training after an eval
    # forward): the same outputs in both modes
    torch.testing.assert_close(logits(ours, x), reference, rtol=0, atol=0)
    # HF's docs name this field "bnb 4bit" but its LoRA bnb layers report None; ours names the backend
    assert {s.quantization_backend for s in lp.get_layer_status(ours)} == {"bnb 4bit"}
    # (b) ours saves (the same keys as HF's file: no quantization in the adapter), HF loads onto its 4-bit base
    # (a fresh base: an eval forward above let bitsandbytes repack `ours`' weights, see exact_logits)
    ours = lp.PeftModel.from_pretrained(ours_4bit(), tmp_path / "hf", is_trainable=True)
    perturb(ours, seed=5)
    ours.save_pretrained(tmp_path / "ours")
    from safetensors.torch import load_file

    assert load_file(tmp_path / "ours" / "adapter_model.safetensors").keys() == (
        load_file(tmp_path / "hf" / "adapter_model.safetensors").keys()
    )
    back = hf.PeftModel.from_pretrained(hf_4bit(llama_dir), tmp_path / "ours").eval()
    torch.testing.assert_close(exact_logits(back, x), exact_logits(ours, x), rtol=0, atol=0)
    # training mode (bitsandbytes' fp32 path, no inference repacking): gradients reach A and B through the 4-bit base
    ours.train()
    ours(input_ids=x).logits.sum().backward()
    grads = [p.grad for n, p in ours.named_parameters() if "lora_" in n]
    assert len(grads) == 12 and all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parity("IA3")
def test_ia3_over_4bit_equals_hf_and_refuses_to_merge(llama_dir, tmp_path):
    x = ids(length=10)
    kwargs = dict(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    theirs = hf.get_peft_model(hf_4bit(llama_dir), hf.IA3Config(**kwargs)).eval()
    perturb(theirs)
    theirs.save_pretrained(tmp_path)
    ours = lp.PeftModel.from_pretrained(ours_4bit(), tmp_path).eval()
    torch.testing.assert_close(logits(ours, x), exact_logits(theirs, x), rtol=0, atol=0)
    before = snapshot(ours)
    with pytest.raises(ValueError, match="cannot merge IA3 adapters into bitsandbytes 4-bit layers"):
        ours.merge_and_unload()
    with pytest.raises(ValueError):  # HF: "Cannot merge ia3 layers when the model is loaded in 4-bit mode"
        theirs.merge_and_unload()
    assert unchanged(ours, before)
    with pytest.raises(ValueError, match="IA3 adapters cannot be merged into 4-bit base layers"):
        q.check_quantized_compatible(lp.IA3Config(), merge=True, kind="int4")
    q.check_quantized_compatible(lp.LoraConfig(), merge=True, kind="int4")


def test_merge_requantizes_like_hf_with_one_warning_and_dequantize_is_exact(llama_dir, tmp_path):
    x = ids(length=10)
    theirs = hf.get_peft_model(hf_4bit(llama_dir), hf.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    perturb(theirs)
    theirs.save_pretrained(tmp_path)
    ours = lp.PeftModel.from_pretrained(ours_4bit(), tmp_path)
    # unmerged: LoRA added to the full-precision view of the 4-bit weight (bitsandbytes' fp32 training path)
    exact = copy.deepcopy(ours)
    q.dequantize_base_linears(exact)
    assert not q.quantized_layer_names(exact)
    unmerged = logits(exact.train(), x)  # no dropout in this config: train() only avoids the inference repacking
    merged_exact = exact.merge_and_unload().eval()
    torch.testing.assert_close(logits(merged_exact, x), unmerged, atol=1e-4, rtol=0)  # W + dW in fp32
    # merged into 4-bit: dequantize, add, requantize with the layer's settings: HF's result exactly, one warning
    LoraLinear4bit._warned_rounding = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged = ours.merge_and_unload()
    assert len([w for w in caught if "requantizes" in str(w.message)]) == 1
    merged_hf = quiet(theirs.merge_and_unload)
    for key, value in merged.state_dict().items():
        assert torch.equal(value, merged_hf.state_dict()[key]), key
    layer = merged.model.layers[0].self_attn.q_proj
    assert q.is_linear4bit(layer) and (layer.weight.quant_type, layer.weight.compress_statistics) == ("nf4", True)
    # 4-bit rounding of the merged weight, not a wrong result
    assert (logits(merged.train(), x) - unmerged).abs().max() < 0.2


def test_merge_after_cpu_inference_repacking_dequantizes_the_real_weight():
    """bitsandbytes repacks a 4-bit weight on its first CPU inference forward (AVX512-BF16 CPUs); merging after
    that must dequantize the real weight (HF PEFT 0.21 reads the packed bytes as if plain)."""
    x = ids(length=10)
    model = lp.get_peft_model(ours_4bit(), lp.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False))
    reference = q.dequantize_base_linears(copy.deepcopy(model)).merge_and_unload().eval()
    logits(model.eval(), x)  # may repack (depends on the CPU)
    merged = quiet(model.merge_and_unload)
    dequantized = q.dequantize_base_linears(merged)
    for key, value in reference.state_dict().items():  # requantizing rounds each block once: small, not garbage
        assert (dequantized.state_dict()[key] - value).abs().max() < 0.5, key


def test_merged_export_is_full_precision_and_loads_without_bitsandbytes(tmp_path):
    from lightning_peft.lightning._state import save_merged_model

    model = lp.get_peft_model(ours_4bit(), lp.LoraConfig(r=4, target_modules=TARGETS))
    perturb(model)
    merged = quiet(model.merge_and_unload)
    save_merged_model(merged, str(tmp_path))
    assert q.int4_layers(merged)  # the model itself stays 4-bit
    config = json.loads((tmp_path / "config.json").read_text())
    assert "quantization_config" not in config
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "model.safetensors")
    assert not [k for k in tensors if "absmax" in k or "quant" in k]
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(plain.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    x = ids(length=10)
    torch.testing.assert_close(logits(plain, x), logits(q.dequantized_copy(merged), x), rtol=0, atol=0)


def test_gpt2_conv1d_is_quantized_transposed():
    model = tiny_gpt2(n_embd=64)
    x = ids(length=10)
    reference = logits(model.train(), x)
    q.quantize_base_linears(model, bits=4, quant_type="fp4", double_quant=False)
    assert q.is_linear4bit(model.transformer.h[0].attn.c_attn)
    assert model.transformer.h[0].attn.c_attn.weight.quant_state.shape == torch.Size([192, 64])  # (out, in)
    model = lp.get_peft_model(model, lp.LoraConfig(r=4, target_modules=["c_attn"], lora_dropout=0.0))
    assert model.peft_config["default"].fan_in_fan_out is False  # bitsandbytes stores (out, in)
    assert (logits(model.train(), x) - reference).abs().max() < 0.5  # FP4 rounding, same layout


def test_quantize_refuses_bad_values_naming_the_argument():
    model = tiny_llama(**SIZES)
    before = snapshot(model)
    cases = [
        (dict(bits=3), "bits must be 8"),
        (dict(bits=True), "bits must be 8"),
        (dict(bits=4, quant_type="int4"), "quant_type must be one of nf4, fp4"),
        (dict(bits=4, compute_dtype="fp8"), "compute_dtype must be one of float32"),
        (dict(bits=4, compute_dtype=torch.int8), "compute_dtype must be one of"),
        (dict(bits=4, double_quant="yes"), "double_quant must be True or False"),
        (dict(bits=4, threshold=3.0), "threshold is the LLM.int8"),
        (dict(quant_type="nf4"), "quant_type only apply to 4-bit layers"),
        (dict(compute_dtype=torch.bfloat16, double_quant=False), "compute_dtype, double_quant only apply"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            q.quantize_base_linears(model, **kwargs)
    assert unchanged(model, before) and not q.quantized_layer_names(model)
    with pytest.raises(ValueError, match="kind must be one of int8, int4"):
        q.check_quantized_compatible(lp.LoraConfig(), kind="int3")
    ours = q.quantize_base_linears(model, bits=4, compute_dtype="bfloat16", quant_type="FP4")
    layer = ours.model.layers[0].mlp.up_proj
    assert (layer.compute_dtype, layer.weight.quant_type) == (torch.bfloat16, "fp4")


def test_prepare_model_for_kbit_training_as_hf(llama_dir):
    def state(model):
        return {n: (p.dtype, p.requires_grad) for n, p in model.named_parameters()}, model.is_gradient_checkpointing

    # HF's user: a bf16 model loaded in 4-bit by transformers; both functions on equal copies
    theirs = quiet(
        AutoModelForCausalLM.from_pretrained,
        llama_dir,
        quantization_config=bnb_config("nf4", True),
        device_map="cpu",
        dtype=torch.bfloat16,
    )
    mine = copy.deepcopy(theirs)
    assert {p.dtype for n, p in theirs.named_parameters() if "norm" in n} == {torch.bfloat16}
    hf.prepare_model_for_kbit_training(theirs)
    assert lp.prepare_model_for_kbit_training(mine) is mine
    assert state(mine) == state(theirs) and state(mine)[1] is True
    assert {p.dtype for n, p in mine.named_parameters() if "norm" in n or "embed" in n} == {torch.float32}
    assert not any(p.requires_grad for p in mine.parameters())
    # with use_reentrant=False no input-grad hook is needed (HF adds none either)
    from lightning_peft.utils.other import prepare_model_for_kbit_training

    plain = tiny_llama(**SIZES).to(torch.bfloat16)
    prepare_model_for_kbit_training(plain)  # not quantized: casts and freezes, no checkpointing (as HF)
    assert plain.is_gradient_checkpointing is False and plain.model.norm.weight.dtype == torch.float32
    # a model quantized here (no transformers flag): checkpointing on, and a training step runs through it
    ours = ours_4bit()
    prepare_model_for_kbit_training(ours, gradient_checkpointing_kwargs={"use_reentrant": False})
    assert ours.is_gradient_checkpointing is True
    peft_model = lp.get_peft_model(ours, lp.LoraConfig(r=4, target_modules=TARGETS)).train()
    x = ids(length=10)
    loss = peft_model(input_ids=x, labels=x).loss
    loss.backward()
    assert all(p.grad is not None for n, p in peft_model.named_parameters() if p.requires_grad)
    # bad arguments: refused before any change
    fresh = ours_4bit()
    before = snapshot(fresh)
    with pytest.raises(TypeError, match="gradient_checkpointing_kwargs must be a dict"):
        lp.prepare_model_for_kbit_training(fresh, gradient_checkpointing_kwargs=["use_reentrant"])
    with pytest.raises(TypeError, match="use_gradient_checkpointing must be True or False"):
        lp.prepare_model_for_kbit_training(fresh, use_gradient_checkpointing="yes")
    with pytest.raises(TypeError, match="model must be a torch nn.Module"):
        lp.prepare_model_for_kbit_training("model")
    net = q.quantize_base_linears(torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64)), bits=4)
    with pytest.raises(AttributeError, match="has no gradient_checkpointing_enable"):
        lp.prepare_model_for_kbit_training(net)
    assert unchanged(fresh, before) and all(p.requires_grad for p in net[1].parameters())


def test_fsdp2_refuses_quantized_layers_with_the_reason():
    from lightning_peft.lightning.strategies import check_fsdp2_quantization

    check_fsdp2_quantization(tiny_llama(**SIZES))  # full precision: fine
    with pytest.raises(ValueError, match=r"FSDP2 cannot shard bitsandbytes quantized layers \(model.layers.0"):
        check_fsdp2_quantization(ours_4bit())


@pytest.mark.slow  # a train.py run (as test_app's int8 run)
def test_app_trains_with_strategy_int4(tmp_path):
    """`python train.py strategy=int4`: LoRA over a 4-bit base through the app; adapter/ and a full-precision
    merged/ that loads without bitsandbytes."""
    import os

    from helpers import run_forked
    from test_app import FAST, REPO_ROOT

    out = tmp_path / "run"
    proc = run_forked(
        [str(REPO_ROOT / "train.py"), "strategy=int4", f"hydra.run.dir={out}", "trainer.max_steps=2", *FAST],
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 1
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    from safetensors.torch import load_file

    merged = load_file(out / "merged" / "model.safetensors")
    assert merged and not [k for k in merged if "absmax" in k or "quant" in k]
    assert {t.dtype for t in merged.values()} == {torch.float32}
