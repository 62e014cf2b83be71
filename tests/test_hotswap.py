"""Hot-swapping LoRA adapters (`lightning_peft.utils.hotswap`, HF PEFT's `peft.utils.hotswap`): the swapped model
gives the new adapter's outputs (as loading it fresh, and as HF peft's swap), every Parameter stays the same object, a
compiled model is not recompiled, and a refused swap leaves the model exactly as it was."""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from helpers import perturb, snapshot, tiny_gpt2, unchanged
from peft.utils.hotswap import hotswap_adapter as hf_hotswap_adapter
from torch import nn

import lightning_peft as lp
from lightning_peft.tuners.lora.layer import LoraLayer
from lightning_peft.utils.hotswap import (
    hotswap_adapter,
    hotswap_adapter_from_state_dict,
    prepare_model_for_compiled_hotswap,
)

GPT2 = dict(fan_in_fan_out=True, init_lora_weights=False)


def save(base, folder, seed, **kwargs):
    """Save an adapter of `base` with non-trivial weights; returns the folder."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lp.get_peft_model(copy.deepcopy(base), lp.LoraConfig(**{**GPT2, **kwargs}))
    perturb(model, seed=seed)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gpt2_adapters(tmp_path_factory):
    """A base and adapter folders: a0 (r=4, alpha 8), a1 (r=4, alpha 32), small (r=2), other targets, more
    targets, another lora_dropout."""
    base = tiny_gpt2()
    root = tmp_path_factory.mktemp("hotswap")
    folders = {
        "a0": save(base, root / "a0", 1, target_modules=["c_attn", "c_fc"], r=4, lora_alpha=8),
        "a1": save(base, root / "a1", 2, target_modules=["c_attn", "c_fc"], r=4, lora_alpha=32),
        "small": save(base, root / "small", 3, target_modules=["c_attn", "c_fc"], r=2, lora_alpha=8),
        "fewer": save(base, root / "fewer", 4, target_modules=["c_attn"], r=4, lora_alpha=8),
        "other": save(base, root / "other", 5, target_modules=["c_attn", "c_proj"], r=4, lora_alpha=8),
        "big": save(base, root / "big", 6, target_modules=["c_attn", "c_fc"], r=8, lora_alpha=8),
        "dropout": save(base, root / "dropout", 7, target_modules=["c_attn", "c_fc"], r=4, lora_dropout=0.1),
    }
    return base, folders


def logits_of(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def loaded(lib, base, folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lib.PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()


X = torch.randint(1, 64, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.mark.parity("LORA")
@pytest.mark.parametrize("new", ["a1", "fewer"])
def test_swap_equals_fresh_load_and_peft(gpt2_adapters, new):
    """Another alpha (scaling), or fewer targets (the others get zeros, as HF PEFT does)."""
    base, folders = gpt2_adapters
    ours, theirs = loaded(lp, base, folders["a0"]), loaded(peft, base, folders["a0"])
    params = dict(ours.named_parameters())
    before = logits_of(ours, X)
    hotswap_adapter(ours, folders[new], adapter_name="default")
    hf_hotswap_adapter(theirs, str(folders[new]), adapter_name="default", torch_device="cpu")
    got = logits_of(ours, X)
    assert not torch.allclose(got, before, atol=1e-3)
    torch.testing.assert_close(got, logits_of(loaded(lp, base, folders[new]), X), atol=1e-5, rtol=0)
    torch.testing.assert_close(got, logits_of(theirs, X), atol=1e-5, rtol=0)
    assert all(p is params[n] for n, p in ours.named_parameters()), "the same Parameter objects"
    assert ours.peft_config["default"].lora_alpha == lp.PeftConfig.from_pretrained(folders[new]).lora_alpha


def test_smaller_rank_padded_and_saved_adapter_reloads(gpt2_adapters, tmp_path):
    """prepare_model_for_compiled_hotswap pads to target_rank (same outputs); a rank-2 adapter swapped in is padded
    with zeros; the config then describes the padded tensors, so the saved adapter reloads to the same outputs."""
    base, folders = gpt2_adapters
    ours = loaded(lp, base, folders["a0"])
    before = logits_of(ours, X)
    prepare_model_for_compiled_hotswap(ours, target_rank=6)
    torch.testing.assert_close(logits_of(ours, X), before, atol=1e-5, rtol=0)
    layer = ours.base_model.model.transformer.h[0].attn.c_attn
    assert layer.lora_A["default"].weight.shape[0] == 6 and isinstance(layer.scaling["default"], torch.Tensor)
    hotswap_adapter(ours, folders["small"], adapter_name="default")
    got = logits_of(ours, X)
    torch.testing.assert_close(got, logits_of(loaded(lp, base, folders["small"]), X), atol=1e-5, rtol=0)
    ours.save_pretrained(tmp_path / "swapped")
    torch.testing.assert_close(logits_of(loaded(lp, base, tmp_path / "swapped"), X), got, atol=1e-5, rtol=0)


@pytest.mark.parity("LORA")
def test_refused_swaps_leave_the_model_as_it_was(gpt2_adapters):
    """Same exception type as HF PEFT where it refuses (other targets: RuntimeError; another lora_dropout, a merged
    adapter: ValueError); refused here too where HF PEFT goes on (a larger rank: it replaces the tensors, breaking
    compiled graphs; NaN; a layer with half its tensors)."""
    base, folders = gpt2_adapters
    ours, theirs = loaded(lp, base, folders["a0"]), loaded(peft, base, folders["a0"])

    def state(model):
        layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        return snapshot(model), [dict(m.scaling) for m in layers], [dict(m.r) for m in layers]

    def refused(error, match, call):
        before = state(ours)
        with pytest.raises(error, match=match):
            call()
        after = state(ours)
        assert unchanged(ours, before[0]) and after[1:] == before[1:]

    for folder, error, match in (("other", RuntimeError, "unexpected keys"), ("dropout", ValueError, "lora_dropout")):
        refused(error, match, lambda: hotswap_adapter(ours, folders[folder], adapter_name="default"))
        with pytest.raises(error, match=match):
            hf_hotswap_adapter(theirs, str(folders[folder]), adapter_name="default", torch_device="cpu")
    refused(ValueError, "Incompatible shapes", lambda: hotswap_adapter(ours, folders["big"], adapter_name="default"))
    refused(ValueError, "no adapter named", lambda: hotswap_adapter(ours, folders["a1"], adapter_name="nope"))
    key = "base_model.model.transformer.h.0.attn.c_attn.lora_A.default.weight"
    good = {k: v.clone() for k, v in ours.state_dict().items() if ".lora_" in k}
    config = copy.deepcopy(ours.peft_config["default"])
    nan = {**good, key: torch.full_like(good[key], float("nan"))}
    refused(ValueError, "NaN", lambda: hotswap_adapter_from_state_dict(ours, nan, "default", config))
    half = {k: v for k, v in good.items() if k != key}
    refused(RuntimeError, "incomplete", lambda: hotswap_adapter_from_state_dict(ours, half, "default", config))
    for model in (ours, theirs):
        model.merge_adapter()
    refused(ValueError, "merged", lambda: hotswap_adapter(ours, folders["a1"], adapter_name="default"))
    with pytest.raises(ValueError, match="merged"):
        hf_hotswap_adapter(theirs, str(folders["a1"]), adapter_name="default", torch_device="cpu")
    ia3 = lp.get_peft_model(
        tiny_gpt2(), lp.IA3Config(target_modules=["c_attn"], feedforward_modules=[], fan_in_fan_out=True)
    )
    with pytest.raises(ValueError, match="only supports LORA"):
        hotswap_adapter(ia3, folders["a1"], adapter_name="default")


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(8, 16)
        self.down = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


def test_compiled_model_is_not_recompiled(tmp_path):
    """torch.compile (aot_eager: the CPU backend that needs no C++ build; inductor behaves alike): after
    prepare_model_for_compiled_hotswap, swapping in an adapter of another alpha and a smaller rank compiles
    nothing new, and the compiled model gives the new adapter's outputs."""
    torch.manual_seed(0)
    base = TinyNet().eval()
    for name, r, alpha, seed in (("a0", 4, 8, 1), ("a1", 2, 32, 2)):
        model = lp.get_peft_model(
            copy.deepcopy(base), lp.LoraConfig(target_modules=["up", "down"], r=r, lora_alpha=alpha)
        )
        perturb(model, seed=seed)
        model.save_pretrained(tmp_path / name)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    model = lp.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a0")
    prepare_model_for_compiled_hotswap(model, target_rank=4)
    with pytest.raises(ValueError, match="before"):
        prepare_model_for_compiled_hotswap(torch.compile(model))
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        first = compiled(x)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    hotswap_adapter(compiled, tmp_path / "a1", adapter_name="default")
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        second = compiled(x)
    assert counters["stats"]["unique_graphs"] == graphs, "the swap must not recompile"
    fresh = lp.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a1")
    with torch.no_grad():
        torch.testing.assert_close(second, fresh(x), atol=1e-5, rtol=1e-6)
    assert not torch.allclose(first, second, atol=1e-3)
    torch._dynamo.reset()


def test_injected_model_and_non_adapter_model(gpt2_adapters):
    """A model given adapters by inject_adapter_in_model swaps too; a plain model is refused with TypeError."""
    base, folders = gpt2_adapters
    config = lp.PeftConfig.from_pretrained(folders["a0"])
    injected = lp.inject_adapter_in_model(config, copy.deepcopy(base)).eval()
    hotswap_adapter(injected, folders["a1"], adapter_name="default")
    torch.testing.assert_close(logits_of(injected, X), logits_of(loaded(lp, base, folders["a1"]), X), atol=1e-5, rtol=0)
    with pytest.raises(TypeError, match="holds no lightning_peft adapter"):
        hotswap_adapter(nn.Linear(2, 2), folders["a1"], adapter_name="default")
