"""DoRA (`use_dora=True`) against HF PEFT 0.21: files both ways, key sets, training-mode outputs and gradients (with and
without dropout), merge / unmerge / safe_merge, mixed batches, 8-bit bases, and the one-node Linear path."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from helpers import (
    ids,
    image,
    logits,
    perturb,
    quiet,
    save_and_reload,
    saved_shapes,
    snapshot,
    tiny_convnet,
    tiny_gpt2,
    tiny_llama,
    unchanged,
)

import lightning_peft as lp
from lightning_peft.tuners.lora import dora

CASES = {
    # GPT-2: Conv1D (fan_in_fan_out) and the tied input embedding
    "gpt2": (tiny_gpt2, dict(target_modules=["c_attn", "c_proj", "wte"], fan_in_fan_out=True), ids),
    "llama": (tiny_llama, dict(target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"]), ids),
    "conv": (tiny_convnet, dict(target_modules=["conv1", "conv2", "head"]), image),
}
CLOSE = dict(atol=2e-5, rtol=2e-5)


@pytest.fixture(scope="module")
def bases():
    return {name: build() for name, (build, _, _) in CASES.items()}


def _pair(bases, case, tmp_path, **extra):
    """(HF model, ours) with the same DoRA adapter: HF builds and saves it (perturbed), ours loads the file."""
    kwargs = dict(CASES[case][1], use_dora=True, **extra)
    hf, mine = save_and_reload(peft, lp, bases[case], "LoraConfig", kwargs, tmp_path / "hf", silence=True)
    return hf, mine


@pytest.mark.parametrize("case", sorted(CASES))
def test_files_both_ways_same_outputs_and_keys(bases, case, tmp_path):
    x = CASES[case][2]()
    kwargs = dict(CASES[case][1], use_dora=True)
    hf, mine = save_and_reload(peft, lp, bases[case], "LoraConfig", kwargs, tmp_path / "hf", silence=True)
    torch.testing.assert_close(logits(mine, x), logits(hf, x), **CLOSE)
    ours, read_by_hf = save_and_reload(lp, peft, bases[case], "LoraConfig", kwargs, tmp_path / "ours", silence=True)
    torch.testing.assert_close(logits(read_by_hf, x), logits(ours, x), **CLOSE)
    keys = saved_shapes(tmp_path / "hf")
    assert keys == saved_shapes(tmp_path / "ours")
    assert any(k.endswith(".lora_magnitude_vector") for k in keys)
    assert lp.PeftConfig.from_pretrained(tmp_path / "hf").use_dora is True
    # in-memory names and flags as HF's (…lora_magnitude_vector.default.weight)
    assert {n: p.requires_grad for n, p in ours.named_parameters()} == {
        n: p.requires_grad
        for n, p in hf.named_parameters()  # both built by get_peft_model
    }
    assert {n: p.requires_grad for n, p in mine.named_parameters()} == {
        n: p.requires_grad
        for n, p in read_by_hf.named_parameters()  # both loaded for inference
    }


def test_fresh_magnitude_equals_hf_and_the_model_starts_as_the_base(bases):
    build, kwargs, make = CASES["llama"]
    x = make()
    hf = quiet(peft.get_peft_model, copy.deepcopy(bases["llama"]), peft.LoraConfig(use_dora=True, **kwargs))
    mine = quiet(lp.get_peft_model, copy.deepcopy(bases["llama"]), lp.LoraConfig(use_dora=True, **kwargs))
    hf_m = {n: p for n, p in hf.named_parameters() if "magnitude" in n}
    mine_m = {n: p for n, p in mine.named_parameters() if "magnitude" in n}
    assert hf_m.keys() == mine_m.keys() and hf_m
    for n in hf_m:
        torch.testing.assert_close(mine_m[n], hf_m[n], **CLOSE)
    torch.testing.assert_close(logits(mine, x), logits(bases["llama"], x), **CLOSE)  # B = 0: the base model


@pytest.mark.parametrize("case", ["gpt2", "llama", "conv"])
# 0.3: above fused.GEOMETRIC_MAX_P the one-node paths draw nn.Dropout's own mask, so the same seed gives HF's
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_training_outputs_and_gradients_equal_hf(bases, case, dropout, tmp_path):
    hf, mine = _pair(bases, case, tmp_path, lora_dropout=dropout)
    x = CASES[case][2]()
    grads = {}
    for name, model in (("hf", hf), ("ours", mine)):
        model.train()
        for n, p in model.named_parameters():
            p.requires_grad_("lora_" in n)
        torch.manual_seed(7)  # the same dropout masks: one draw per layer, in the same order
        out = model(x)
        out = out if isinstance(out, torch.Tensor) else out.logits
        (out.square().mean()).backward()
        grads[name] = (out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    torch.testing.assert_close(grads["ours"][0], grads["hf"][0], **CLOSE)
    assert grads["ours"][1].keys() == grads["hf"][1].keys()
    for n, g in grads["hf"][1].items():
        torch.testing.assert_close(grads["ours"][1][n], g, atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("case", sorted(CASES))
def test_merge_unmerge_safe_merge_equal_hf(bases, case, tmp_path):
    hf, mine = _pair(bases, case, tmp_path)
    x = CASES[case][2]()
    before = logits(mine, x)
    mine.merge_adapter()
    torch.testing.assert_close(logits(mine, x), before, **CLOSE)
    mine.unmerge_adapter()
    torch.testing.assert_close(logits(mine, x), before, **CLOSE)
    merged_hf = quiet(hf.merge_and_unload, safe_merge=True)
    merged = mine.merge_and_unload(safe_merge=True)
    hf_state = merged_hf.state_dict()
    for k, v in merged.state_dict().items():
        if k != "lm_head.weight":  # GPT-2's tied head: HF merges into it too, ours keeps it (README "What differs")
            torch.testing.assert_close(v, hf_state[k], **CLOSE, msg=k)
    torch.testing.assert_close(logits(merged, x), before, **CLOSE)


def test_two_adapters_merged_in_turn_equal_hf(bases):
    """The second DoRA adapter's norms are those of the unmerged weight (HF PEFT's `_unmerged_base_weight`)."""
    _, kwargs, make = CASES["llama"]
    models = []
    for lib in (peft, lp):
        model = quiet(lib.get_peft_model, copy.deepcopy(bases["llama"]), lib.LoraConfig(use_dora=True, **kwargs))
        quiet(model.add_adapter, "second", lib.LoraConfig(use_dora=True, **kwargs))
        models.append(model)
    hf, mine = models
    perturb(hf, trainable_only=False, scale=0.05)  # every tensor: the second adapter's too (not trainable)
    with torch.no_grad():
        for n, p in mine.named_parameters():
            p.copy_(dict(hf.named_parameters())[n])
    x = make()
    hf.base_model.set_adapter(["default", "second"])
    mine.base_model.set_adapter(["default", "second"])
    unmerged = logits(mine, x)
    torch.testing.assert_close(unmerged, logits(hf, x), **CLOSE)
    original = {n: p.clone() for n, p in mine.named_parameters() if "base_layer.weight" in n}
    for model in models:
        quiet(model.base_model.merge_adapter)
    hf_params = dict(hf.named_parameters())
    for n, p in mine.named_parameters():
        if n in original:
            torch.testing.assert_close(p, hf_params[n], **CLOSE, msg=n)
    torch.testing.assert_close(logits(mine, x), unmerged, atol=1e-4, rtol=1e-4)
    mine.unmerge_adapter()
    for n, p in mine.named_parameters():
        if n in original:
            torch.testing.assert_close(p, original[n], atol=2e-4, rtol=0, msg=n)  # divided and subtracted back


def test_safe_merge_refuses_nan_and_leaves_the_model(bases, tmp_path):
    _, mine = _pair(bases, "llama", tmp_path)
    layer = mine.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].weight[0] = float("nan")
    before = {n: p.clone() for n, p in mine.named_parameters() if "base_layer" in n}
    assert before  # the loop below compares something
    with pytest.raises(ValueError, match="NaN/inf"):
        mine.merge_adapter(safe_merge=True)
    assert not any(m.merged for m in mine.modules() if isinstance(m, lp.tuners.lora.LoraLayer))
    for n, p in mine.named_parameters():
        if n in before:
            assert torch.equal(p, before[n]), n


def test_mixed_batch_refused_as_hf(bases, tmp_path):
    hf, mine = _pair(bases, "llama", tmp_path)
    x = ids()
    for model in (hf, mine):
        with pytest.raises(ValueError, match="Cannot pass `adapter_names` when DoRA is enabled"):
            model(x, adapter_names=["default", "__base__"])
    # only base rows: allowed in both
    torch.testing.assert_close(mine(x, adapter_names=["__base__"] * 2).logits, logits(bases["llama"], x), **CLOSE)


def test_dora_over_8bit_base_is_refused_clearly():
    pytest.importorskip("bitsandbytes")
    from lightning_peft import quantization as q

    model = q.quantize_base_linears(tiny_llama())
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"use_dora=True is not supported over a Linear8bitLt"):
        quiet(lp.get_peft_model, model, lp.LoraConfig(target_modules=["q_proj"], use_dora=True))
    assert unchanged(model, before)


def test_refusals_that_leave_state(bases, tmp_path):
    with pytest.raises(TypeError, match="use_dora must be True or False"):
        lp.LoraConfig(target_modules=["q_proj"], use_dora="yes")
    assert lp.LoraConfig(target_modules=["q_proj"], use_dora=1).use_dora is True
    _, mine = _pair(bases, "llama", tmp_path)
    quiet(mine.add_adapter, "other", lp.LoraConfig(target_modules=["q_proj"]))
    before = snapshot(mine)
    with pytest.raises(ValueError, match="cannot combine DoRA adapters"):
        mine.add_weighted_adapter(["default", "other"], [1.0, 1.0], "mix", combination_type="svd")
    assert unchanged(mine, before) and "mix" not in mine.peft_config
    from lightning_peft.utils.hotswap import hotswap_adapter

    mine.save_pretrained(tmp_path / "again")
    with pytest.raises(ValueError, match="hot-swapping DoRA adapters"):
        hotswap_adapter(mine, str(tmp_path / "again"), "default")
    assert unchanged(mine, before)


def test_second_adapter_plain_and_dora_side_by_side(bases, tmp_path):
    """A plain LoRA adapter next to a DoRA one in the same layers: each runs as its own, switching works."""
    hf, mine = _pair(bases, "llama", tmp_path)
    x = ids()
    for model, lib in ((hf, peft), (mine, lp)):
        quiet(model.add_adapter, "plain", lib.LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    with torch.no_grad():
        for n, p in mine.named_parameters():
            if ".plain." in n:
                p.copy_(dict(hf.named_parameters())[n])
    for name in ("plain", "default"):
        hf.set_adapter(name)
        mine.set_adapter(name)
        torch.testing.assert_close(logits(mine, x), logits(hf, x), **CLOSE)
    hf.base_model.set_adapter(["default", "plain"])
    mine.base_model.set_adapter(["default", "plain"])
    torch.testing.assert_close(logits(mine, x), logits(hf, x), **CLOSE)


def test_one_node_path_gradients_in_double():
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5).double()
    layer = lp.tuners.lora.Linear(base, "default", r=3, lora_alpha=6, init_lora_weights=False, use_dora=True)
    layer.double()
    x = torch.randn(2, 4, 6, dtype=torch.double, requires_grad=True)
    assert dora._fast_path(layer, "default", x, base(x)) == 0.0  # the no-dropout node
    params = [
        layer.lora_A["default"].weight,
        layer.lora_B["default"].weight,
        layer.lora_magnitude_vector["default"].weight,
    ]
    base.bias.requires_grad_(True)
    # (no gradcheck: the norm depends on A and B but is detached by design, as in HF PEFT and the paper)
    # the op-for-op composition (a hook on A forces it) gives the same output and gradients
    out = layer(x)
    grads = torch.autograd.grad(out.sum(), (x, *params, base.bias))
    handle = layer.lora_A["default"].register_forward_hook(lambda *a: None)
    assert dora._fast_path(layer, "default", x, base(x)) is None
    slow = layer(x)
    slow_grads = torch.autograd.grad(slow.sum(), (x, *params, base.bias))
    handle.remove()
    torch.testing.assert_close(out, slow)
    for a, b in zip(grads, slow_grads):
        torch.testing.assert_close(a, b)


def test_norms_follow_the_base_weight(bases, tmp_path):
    """No stale norm: a base weight changed in place, by `.data`, or by a dtype move gives HF's output."""
    hf, mine = _pair(bases, "llama", tmp_path)
    x = ids()
    logits(mine, x)
    for model in (hf, mine):
        with torch.no_grad():
            model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.data.mul_(1.5)
            model.base_model.model.model.layers[1].self_attn.v_proj.base_layer.weight.data = (
                model.base_model.model.model.layers[1].self_attn.v_proj.base_layer.weight.data * 0.5
            )
    torch.testing.assert_close(logits(mine, x), logits(hf, x), **CLOSE)
    mine.double()
    hf.double()
    torch.testing.assert_close(logits(mine, x), logits(hf, x), **CLOSE)
