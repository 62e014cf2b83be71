"""HF PEFT's configs and mistakes, against the installed `peft` as the reference.

1. Every field of HF PEFT's LoRA / IA3 / prompt-learning configs (read from `dataclasses.fields` of the installed
   classes, so a newer peft with more fields fails here loudly) is accepted at its neutral value, in code and from an
   `adapter_config.json` HF PEFT wrote; the fields of features not implemented here are refused at any other value,
   naming the field, in code and from a file; the others are kept and round-trip.
2. The same mistake raises the same exception type in both libraries (where HF PEFT's choice is reasonable), and
   the warnings HF PEFT gives are given here too.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings

import peft
import pytest
import torch
from helpers import ids, quiet, tiny_gpt2

import lightning_peft as lp
from lightning_peft.tuners.lora.config import NONE_ONLY, NOT_IMPLEMENTED
from lightning_peft.tuners.prompt_learning.config import PromptLearningConfig

# (HF PEFT class, ours, the arguments a usable config needs)
PAIRS = [
    (peft.PeftConfig, lp.PeftConfig, {}),
    (peft.PromptLearningConfig, PromptLearningConfig, {}),
    (peft.LoraConfig, lp.LoraConfig, {}),
    (peft.IA3Config, lp.IA3Config, {}),
    (peft.PromptTuningConfig, lp.PromptTuningConfig, {"num_virtual_tokens": 4}),
    (peft.PromptEncoderConfig, lp.PromptEncoderConfig, {"num_virtual_tokens": 4}),
    (peft.PrefixTuningConfig, lp.PrefixTuningConfig, {"num_virtual_tokens": 4}),
]
TUNER_PAIRS = [pair for pair in PAIRS if pair[1].PEFT_TYPE is not None]
IDS = [hf.__name__ for hf, _, _ in PAIRS]
TUNER_IDS = [hf.__name__ for hf, _, _ in TUNER_PAIRS]


def hf_defaults(hf_cls) -> dict:
    """Every init field of the installed HF class at its default."""
    out = {}
    for f in dataclasses.fields(hf_cls):
        if not f.init:
            continue
        assert f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING, f.name
        out[f.name] = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return out


def hf_file(tmp_path, hf_cls, extra, **changes):
    """The adapter_config.json HF PEFT writes for hf_cls(**extra), with `changes` applied; returns the folder."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_cls(**extra).save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return tmp_path


def plain(value):
    """JSON-comparable: sets and tuples as sorted lists, enums as their values."""
    if isinstance(value, (set, frozenset, list, tuple)):
        items = [plain(v) for v in value]
        return sorted(items, key=repr) if isinstance(value, (set, frozenset)) else items
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return getattr(value, "value", value)


# ---- 1. fields of newer PEFT versions ------------------------------------------------------------
@pytest.mark.parametrize("hf_cls,ours,extra", PAIRS, ids=IDS)
def test_every_hf_field_is_a_field_here_and_accepted_at_its_default_in_code(hf_cls, ours, extra):
    hf_fields = {f.name for f in dataclasses.fields(hf_cls) if f.init}
    our_fields = {f.name for f in dataclasses.fields(ours) if f.init}
    assert hf_fields - our_fields == set(), "HF PEFT has fields this class lacks: add them (kept or refused)"
    kwargs = {**hf_defaults(hf_cls), **extra}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neutral values need no warning
        config = ours(**kwargs)
    assert config == ours(**extra)


@pytest.mark.parametrize("hf_cls,ours,extra", TUNER_PAIRS, ids=TUNER_IDS)
def test_a_config_file_hf_wrote_reads_without_warning_and_round_trips(tmp_path, hf_cls, ours, extra):
    folder = hf_file(tmp_path, hf_cls, extra)
    written = json.loads((folder / "adapter_config.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = lp.PeftConfig.from_pretrained(folder)
    assert type(config) is ours
    # the same keys as HF PEFT's to_dict, with the same values (peft_version as the file had it)
    ours_dict = config.to_dict()
    assert set(ours_dict) == set(written)
    assert {k: plain(v) for k, v in ours_dict.items()} == {k: plain(v) for k, v in written.items()}
    # and back: HF PEFT reads what we write as the config it wrote
    config.save_pretrained(tmp_path / "again")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = peft.PeftConfig.from_pretrained(str(tmp_path / "again"))
        original = peft.PeftConfig.from_pretrained(str(folder))
    assert again == original


@pytest.mark.parametrize("hf_cls,ours,extra", TUNER_PAIRS, ids=TUNER_IDS)
def test_to_dict_has_hf_peft_keys(hf_cls, ours, extra):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_keys = set(hf_cls(**extra).to_dict())
    assert set(ours(**extra).to_dict()) == hf_keys  # LoraConfig: runtime_config is left out by both


# a non-neutral value for each field of a feature lightning_peft does not implement
NOT_NEUTRAL = {
    "exclude_modules": ["c_proj"],
    "use_rslora": True,
    "megatron_config": {"tensor_model_parallel_size": 2},
    "trainable_token_indices": [0, 1],
    "use_dora": True,
    "velora_config": {},  # a sub-config switches its feature on by being there, even empty
    "alora_invocation_tokens": [5, 6],
    "use_qalora": True,
    "monteclora_config": {},
    "layer_replication": [[0, 2], [1, 2]],
    "lora_bias": True,
    "target_parameters": ["mlp.experts.weight"],
    "use_bdlora": {},
    "arrow_config": {"top_k": 2},
    "kasa_config": {},
    "ensure_weight_tying": True,
}


def test_every_refused_lora_field_is_tried():
    assert set(NOT_NEUTRAL) == set(NOT_IMPLEMENTED)
    assert set(NONE_ONLY) <= set(NOT_IMPLEMENTED)


@pytest.mark.parametrize("name", sorted(NOT_NEUTRAL))
def test_a_feature_not_implemented_is_refused_in_code_and_from_a_file(tmp_path, name):
    value = NOT_NEUTRAL[name]
    with pytest.raises(ValueError, match=rf"^{name}=.* which lightning_peft does not implement"):
        lp.LoraConfig(target_modules=["c_attn"], **{name: value})
    folder = hf_file(tmp_path, peft.LoraConfig, {"target_modules": ["c_attn"]}, **{name: value})
    with pytest.raises(ValueError, match=rf"^{name}=.* which lightning_peft does not implement"):
        lp.PeftConfig.from_pretrained(folder)


def test_ia3_exclude_modules_is_refused_unless_empty(tmp_path):
    assert lp.IA3Config(exclude_modules=[]).exclude_modules == []
    with pytest.raises(ValueError, match="exclude_modules=.* which lightning_peft does not implement"):
        lp.IA3Config(target_modules=["c_attn"], exclude_modules=["c_proj"])


def test_fields_without_effect_here_are_kept_and_round_trip(tmp_path):
    config = lp.LoraConfig(
        target_modules=["c_attn"],
        revision="v2",
        base_model_name_or_path="org/model",
        peft_version="0.99.0",
        megatron_core="my.megatron",
        qalora_group_size=32,
        auto_mapping={"base_model_class": "GPT2LMHeadModel", "parent_library": "transformers"},
        runtime_config=peft.tuners.lora.config.LoraRuntimeConfig(ephemeral_gpu_offload=True),
    )
    assert config.runtime_config.ephemeral_gpu_offload is True
    assert "runtime_config" not in config.to_dict()  # as HF PEFT: never saved
    assert lp.LoraConfig.from_dict(config.to_dict()) == dataclasses.replace(config, runtime_config=lp_runtime())
    config.save_pretrained(tmp_path)
    again = lp.PeftConfig.from_pretrained(tmp_path)
    for name in ("revision", "base_model_name_or_path", "peft_version", "megatron_core", "qalora_group_size"):
        assert getattr(again, name) == getattr(config, name), name
    hf = peft.PeftConfig.from_pretrained(str(tmp_path))
    assert (hf.megatron_core, hf.qalora_group_size, hf.revision) == ("my.megatron", 32, "v2")


@pytest.mark.parametrize("projection", [False, True])
def test_prefix_tuning_init_weights_zero_gives_hf_peft_outputs(projection):
    base = tiny_gpt2()
    kwargs = dict(task_type="CAUSAL_LM", num_virtual_tokens=3, init_weights="zero", prefix_projection=projection)
    ours = lp.get_peft_model(copy.deepcopy(base), lp.PrefixTuningConfig(**kwargs))
    hf = quiet(peft.get_peft_model, copy.deepcopy(base), peft.PrefixTuningConfig(**kwargs))
    encoder = ours.prompt_encoder["default"]
    assert not (encoder.transform[-1] if projection else encoder.embedding).weight.any()
    x = ids()
    torch.testing.assert_close(ours(x).logits, hf(x).logits)
    with pytest.raises(ValueError, match="init_weights must be None .random. or 'zero', got 'ones'"):
        lp.PrefixTuningConfig(num_virtual_tokens=3, init_weights="ones")


def lp_runtime():
    from lightning_peft.tuners.lora.config import LoraRuntimeConfig

    return LoraRuntimeConfig()


def test_a_runtime_config_in_a_file_is_dropped_with_a_warning(tmp_path):
    folder = hf_file(tmp_path, peft.LoraConfig, {"target_modules": ["c_attn"]}, runtime_config={})
    with pytest.warns(UserWarning, match="runtime_config; ignored"):
        config = lp.PeftConfig.from_pretrained(folder)
    assert config.runtime_config == lp_runtime()


@pytest.mark.parametrize(
    "name,value,message",
    [
        ("eva_config", {"rho": 2.0}, "eva_config is set but ignored"),
        ("corda_config", {"cache_file": None}, "corda_config is set but ignored"),
        ("loftq_config", {"loftq_bits": 4}, "loftq_config is set but ignored"),
    ],
)
def test_initialisation_sub_configs_warn_they_are_ignored_as_in_hf(name, value, message):
    with pytest.warns(UserWarning, match=name):
        peft.LoraConfig(**{name: value})
    with pytest.warns(UserWarning, match=message):
        lp.LoraConfig(**{name: value})


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "loftq", "eva", "corda", "orthogonal", "mica"])
def test_hf_only_initialisations_are_refused_naming_the_field(init):
    with pytest.raises(ValueError, match=f"init_lora_weights='{init}' is an HF PEFT initialisation"):
        lp.LoraConfig(init_lora_weights=init)
