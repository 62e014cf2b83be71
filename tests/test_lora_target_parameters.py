"""LoRA on nn.Parameters (`LoraConfig.target_parameters`, HF PEFT's lora.ParamWrapper): a tiny mixture-of-experts
module with stacked expert weights, compared with HF `peft` 0.21 both ways through files, merged, trained one step;
HF PEFT's refusals with its exception types."""

from __future__ import annotations

import copy
import json
import warnings

import peft
import pytest
import torch
from helpers import quiet, saved_shapes
from torch import nn

import lightning_peft as lp
from lightning_peft.tuners.lora.param_wrapper import ParamWrapper
from lightning_peft.utils.error import NoMatchingPeftModuleError


class Experts(nn.Module):
    """Stacked expert weights: gate_up (experts, out, in) as HF PEFT reads a 3-D parameter, down the same; `scale` is
    a 2-D parameter; `bias` a 1-D one (not adaptable)."""

    def __init__(self, transposed: bool = False) -> None:
        super().__init__()
        self.is_transposed = transposed
        self.gate_up = nn.Parameter(torch.randn(3, 8, 12) if transposed else torch.randn(3, 12, 8))
        self.down = nn.Parameter(torch.randn(3, 12, 8) if transposed else torch.randn(3, 8, 12))
        self.scale = nn.Parameter(torch.randn(8, 8))
        self.bias = nn.Parameter(torch.zeros(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, experts, 8)
        gate_up = self.gate_up if self.is_transposed else self.gate_up.transpose(1, 2)
        down = self.down if self.is_transposed else self.down.transpose(1, 2)
        h = torch.relu(torch.einsum("bei,eio->beo", x, gate_up))
        return torch.einsum("bei,eio->beo", h, down) @ self.scale.T + self.bias


class MoE(nn.Module):
    def __init__(self, transposed: bool = False) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.experts = Experts(transposed)
        self.out = nn.Linear(8, 4)
        self.top = nn.Parameter(torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.experts(self.proj(x))) * self.top


def moe(transposed: bool = False) -> MoE:
    torch.manual_seed(0)
    return MoE(transposed).eval()


X = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(1))
KW = dict(r=2, lora_alpha=4, target_modules=["proj"], target_parameters=["experts.gate_up", "down", "scale"])


def _random(model: nn.Module) -> None:
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))


def _out(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(X)


@pytest.fixture(scope="module", params=[False, True], ids=["experts-out-in", "is_transposed"])
def hf_pair(request, tmp_path_factory):
    """(base, HF model with random adapter values, its folder)."""
    base = moe(request.param)
    hf = quiet(peft.get_peft_model, copy.deepcopy(base), peft.LoraConfig(**KW))
    _random(hf)
    folder = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(folder)
    return base, hf, folder


@pytest.mark.parity("LORA")
def test_hf_file_loads_here_and_ours_loads_in_hf(hf_pair, tmp_path):
    base, hf, folder = hf_pair
    assert json.loads((folder / "adapter_config.json").read_text())["target_parameters"] == KW["target_parameters"]
    ours = lp.PeftModel.from_pretrained(copy.deepcopy(base), folder)
    assert ours.peft_config["default"].target_parameters == KW["target_parameters"]
    torch.testing.assert_close(_out(ours), _out(hf), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(_out(ours), _out(base))  # the adapter does something
    # nesting as HF's: each targeted parameter of `experts` is one wrapper, in registration order
    assert [n for n, m in ours.named_modules() if isinstance(m, ParamWrapper)] == [
        "base_model.model.experts",
        "base_model.model.experts.base_layer",
        "base_model.model.experts.base_layer.base_layer",
    ]
    ours.save_pretrained(tmp_path)
    assert saved_shapes(tmp_path) == saved_shapes(folder)
    back = quiet(peft.PeftModel.from_pretrained, copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(_out(back), _out(ours), rtol=1e-4, atol=1e-5)


@pytest.mark.parity("LORA")
def test_same_parameters_flags_merge_and_training_step_as_hf(hf_pair):
    base, hf, _ = hf_pair
    ours = lp.get_peft_model(copy.deepcopy(base), lp.LoraConfig(**KW))
    # sorted: HF's parametrization re-registers a parameter at the end of its module after each forward
    assert sorted((n, p.requires_grad) for n, p in ours.named_parameters()) == sorted(
        (n, p.requires_grad) for n, p in hf.named_parameters()
    )
    ours.load_state_dict(hf.state_dict())
    expected = _out(hf)
    torch.testing.assert_close(_out(ours), expected, rtol=1e-4, atol=1e-5)
    # one training step: the same gradients
    hf_copy = copy.deepcopy(hf)
    for model in (ours, hf_copy):
        model.train()
        model(X).square().sum().backward()
    grads = {n: p.grad for n, p in hf_copy.named_parameters() if p.requires_grad}
    for n, p in ours.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-5)
    ours.eval()
    with ours.disable_adapter():
        torch.testing.assert_close(_out(ours), _out(base))
    ours.merge_adapter()
    torch.testing.assert_close(_out(ours), expected, rtol=1e-4, atol=1e-5)
    ours.unmerge_adapter()
    torch.testing.assert_close(_out(ours), expected, rtol=1e-4, atol=1e-5)
    merged = ours.merge_and_unload()
    assert type(merged.experts) is Experts and not any(isinstance(m, ParamWrapper) for m in merged.modules())
    hf_merged = quiet(copy.deepcopy(hf).merge_and_unload)
    torch.testing.assert_close(_out(merged), _out(hf_merged), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(_out(merged), expected, rtol=1e-4, atol=1e-5)


def test_merging_twice_and_saving_after_merge(tmp_path):
    model = lp.get_peft_model(moe(), lp.LoraConfig(**KW))
    _random(model)
    expected = _out(model)
    model.save_pretrained(tmp_path / "before")
    model.merge_adapter()
    with pytest.warns(UserWarning, match="already merged"):
        model.merge_adapter()
    torch.testing.assert_close(_out(model), expected, rtol=1e-4, atol=1e-5)
    model.save_pretrained(tmp_path / "after")
    from safetensors.torch import load_file

    before = load_file(tmp_path / "before/adapter_model.safetensors")
    after = load_file(tmp_path / "after/adapter_model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    model.unmerge_adapter()
    torch.testing.assert_close(_out(model), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="mixed batch"):  # HF PEFT's refusal too
        model.eval()(X, adapter_names=["default", "__base__"])


def test_a_second_adapter_on_the_same_parameters_as_hf():
    base = moe()
    models = []
    for lib in (peft, lp):
        model = quiet(lib.get_peft_model, copy.deepcopy(base), lib.LoraConfig(**KW))
        quiet(model.add_adapter, "other", lib.LoraConfig(**KW))
        _random(model)
        model.set_adapter("other")
        models.append(model)
    hf, ours = models
    # sorted: HF's parametrization re-registers a parameter at the end of its module after each forward
    assert sorted((n, p.requires_grad) for n, p in ours.named_parameters()) == sorted(
        (n, p.requires_grad) for n, p in hf.named_parameters()
    )
    ours.load_state_dict(hf.state_dict())
    torch.testing.assert_close(_out(ours), _out(hf), rtol=1e-4, atol=1e-5)
    for lib, model in zip((peft, lp), models):
        other = dict(KW, target_parameters=["scale"])
        with pytest.raises(ValueError, match="all adapters must target the same set of parameters"):
            model.add_adapter("third", lib.LoraConfig(**other))


def _state(model: nn.Module) -> list:
    return [(n, type(m).__name__) for n, m in model.named_modules()] + [
        (n, p.requires_grad) for n, p in model.named_parameters()
    ]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(target_parameters=["proj.weight"]), ValueError, "not a valid target"),
        (dict(lora_dropout=0.1), ValueError, "does not work with lora_dropout"),
        (dict(target_modules=[], target_parameters=["nothere"]), NoMatchingPeftModuleError, "target_parameters"),
        (dict(target_modules=[], target_parameters=["bias"]), ValueError, "only 2d and 3d"),
        (dict(target_modules=[], target_parameters=["top"]), ValueError, "top-level module"),
    ],
    ids=["also-a-target-module", "dropout", "missing", "1-d", "top-level"],
)
def test_refusals_leave_the_model_as_it_was_with_hf_types(kwargs, error, match):
    config = dict(KW, **kwargs)
    with pytest.raises(ValueError) as hf_error:
        quiet(peft.get_peft_model, moe(), peft.LoraConfig(**config))
    assert type(hf_error.value).__name__ == error.__name__  # HF's own NoMatchingPeftModuleError class
    model = moe()
    before = _state(model)
    with pytest.raises(error, match=match):
        lp.get_peft_model(model, lp.LoraConfig(**config))
    assert _state(model) == before
    # the same mistake in a second adapter leaves the first one as it was
    peft_model = lp.get_peft_model(moe(), lp.LoraConfig(r=2, target_modules=["out"]))
    before = _state(peft_model)
    with pytest.raises(error, match=match):
        peft_model.add_adapter("other", lp.LoraConfig(**config))
    assert _state(peft_model) == before and list(peft_model.peft_config) == ["default"]


def test_config_values_and_partly_unmatched_names():
    with pytest.raises(TypeError, match="target_parameters must be a list"):
        lp.LoraConfig(target_parameters="experts.down")
    with pytest.raises(TypeError, match="target_parameters must be a list"):
        lp.LoraConfig(target_parameters=[3])
    with pytest.warns(RuntimeWarning, match=r"\['nothere'\] matched no parameter"):
        lp.get_peft_model(moe(), lp.LoraConfig(**dict(KW, target_parameters=["down", "nothere"])))
    with pytest.warns(RuntimeWarning, match="no parameter was matched"):
        lp.get_peft_model(moe(), lp.LoraConfig(**dict(KW, target_parameters=["nothere"])))
    model = lp.get_peft_model(moe(), lp.LoraConfig(**KW))
    model.add_adapter("plain", lp.LoraConfig(r=2, target_modules=["out"]))
    with pytest.raises(ValueError, match="target_parameters"):
        model.add_weighted_adapter(["default", "plain"], [1.0, 1.0], "mix")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.delete_adapter("plain")
