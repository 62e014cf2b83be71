"""The adapter configs that ride in a checkpoint's state-dict metadata, read as untrusted input: an edited or
foreign checkpoint is refused with a clear message before any module is built or any weight is copied."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("lightning")
import lightning.pytorch as pl  # noqa: E402

import lightning_peft as lp  # noqa: E402
from lightning_peft.lightning import PEFTCallback, PEFTMixin, checkpoint_adapter_configs  # noqa: E402
from lightning_peft.lightning._state import CHECKPOINT_KEY  # noqa: E402
from tests.helpers import GPT2_LORA, tiny_gpt2  # noqa: E402


class Lit(PEFTMixin, pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_gpt2(seed=0)
        self.peft_config = lp.LoraConfig(r=2, **GPT2_LORA)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    module = Lit()
    module.configure_model()
    path = tmp_path_factory.mktemp("meta") / "good.ckpt"
    torch.save({"state_dict": module.state_dict()}, path)
    return module, path


def edited(saved, tmp_path, edit):
    checkpoint = torch.load(saved[1], weights_only=True)
    metadata = checkpoint["state_dict"]._metadata[""]
    metadata[CHECKPOINT_KEY] = edit(copy.deepcopy(metadata[CHECKPOINT_KEY]))
    path = tmp_path / "edited.ckpt"
    torch.save(checkpoint, path)
    return path, checkpoint["state_dict"]


def _rank(entries):
    entries["model"]["config"]["r"] = 2**40
    for adapter in entries["model"]["adapters"].values():
        adapter["config"]["r"] = 2**40
    return entries


def _set(entries, key, value):
    entries["model"][key] = value
    return entries


MALFORMED = {
    "a list": lambda e: ["not", "a dict"],
    "entry not a dict": lambda e: {"model": "LORA"},
    "adapters not a dict": lambda e: _set(e, "adapters", ["default"]),
    "no config": lambda e: _set(_set(e, "adapters", {"default": {"peft_type": "LORA"}}), "config", None),
    "active not among adapters": lambda e: _set(e, "adapter_name", "other"),
}


def test_a_good_checkpoint_loads_through_one_call(saved):
    module = PEFTCallback.load_from_checkpoint(Lit, saved[1])
    assert module.state_dict().keys() == saved[0].state_dict().keys()
    assert checkpoint_adapter_configs(saved[1])["model"]["config"]["r"] == 2


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_metadata_is_refused_by_name(saved, tmp_path, case):
    path, state_dict = edited(saved, tmp_path, MALFORMED[case])
    with pytest.raises(ValueError, match=r"adapter metadata .*'lightning_peft'.* is malformed"):
        checkpoint_adapter_configs(path)
    with pytest.raises(ValueError, match="is malformed"):
        PEFTCallback.load_from_checkpoint(Lit, path)
    module = Lit()
    module.configure_model()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(ValueError, match="is malformed"):
        module.load_state_dict(state_dict)
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_a_huge_rank_in_the_metadata_is_refused_before_building(saved, tmp_path):
    path, _ = edited(saved, tmp_path, _rank)
    with pytest.raises(ValueError, match=r"r=1099511627776 is above"):
        PEFTCallback.load_from_checkpoint(Lit_plain, path)


class Lit_plain(pl.LightningModule):  # noqa: N801
    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_gpt2(seed=0)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(export_dir=""), ValueError, r"export_dir=''\): pass a folder path"),
        (dict(export_dir=123), ValueError, r"export_dir=123\): pass a folder path"),
        (dict(export_extras=5), TypeError, r"export_extras=5\): pass a callable"),
    ],
)
def test_export_arguments_are_checked_when_the_callback_is_built(kwargs, error, match):
    """An empty export_dir would export into the working directory, a non-callable export_extras would fail only
    after the whole fit."""
    with pytest.raises(error, match=match):
        PEFTCallback(lp.LoraConfig(r=2, **GPT2_LORA), **kwargs)
