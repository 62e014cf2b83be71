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
import re
import warnings

import peft
import pytest
import torch
from helpers import ids, quiet, snapshot, tiny_gpt2, unchanged

import lightning_peft as lp
from lightning_peft.tuners.lora.config import NONE_ONLY, NOT_IMPLEMENTED
from lightning_peft.tuners.prompt_learning.config import PromptLearningConfig
from lightning_peft.utils import NoMatchingPeftModuleError, PeftWarning

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


def test_hf_peft_enum_members_are_accepted():
    config = lp.PromptEncoderConfig(
        task_type=peft.TaskType.SEQ_2_SEQ_LM,
        num_virtual_tokens=2,
        encoder_reparameterization_type=peft.PromptEncoderReparameterizationType.LSTM,
    )
    assert config.task_type is lp.TaskType.SEQ_2_SEQ_LM
    assert config.encoder_reparameterization_type is lp.PromptEncoderReparameterizationType.LSTM
    assert (
        lp.PromptTuningConfig(prompt_tuning_init=peft.PromptTuningInit.SAMPLE_VOCAB).prompt_tuning_init
        == "SAMPLE_VOCAB"
    )


# a non-neutral value for each field of a feature lightning_peft does not implement
NOT_NEUTRAL = {
    "megatron_config": {"tensor_model_parallel_size": 2},
    "velora_config": {},  # a sub-config switches its feature on by being there, even empty
    "alora_invocation_tokens": [5, 6],
    "use_qalora": True,
    "monteclora_config": {},
    "lora_bias": True,
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


@pytest.mark.parametrize("init", ["eva", "corda", "orthogonal", "mica"])  # pissa / olora / loftq: test_lora_init
def test_hf_only_initialisations_are_refused_naming_the_field(init):
    with pytest.raises(ValueError, match=f"init_lora_weights='{init}' is an HF PEFT initialisation"):
        lp.LoraConfig(init_lora_weights=init)


# ---- 2. the same exception type for the same mistake -------------------------------------------
@pytest.fixture(scope="module")
def gpt2():
    return tiny_gpt2()


class WithHeads(torch.nn.Module):
    """A model whose `heads` is a ModuleDict (no forward of its own: it cannot be saved as a whole module)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.heads = torch.nn.ModuleDict({"a": torch.nn.Linear(4, 4)})

    def forward(self, x):
        return self.heads["a"](self.lin(x))


def config_file(folder, data):
    (folder / "adapter_config.json").write_text(json.dumps(data))
    return str(folder)


def lora(lib, base, **kwargs):
    """lib.get_peft_model(base, LoraConfig(target_modules=["c_attn"], fan_in_fan_out=True, **kwargs))."""
    return lib.get_peft_model(base, lib.LoraConfig(**{"target_modules": ["c_attn"], "fan_in_fan_out": True, **kwargs}))


def with_adapter(**kwargs):
    """A set-up: tiny GPT-2 with a LoRA adapter "default" (modules_to_save=["lm_head"] unless given)."""
    return lambda L, m: lora(L, m, **{"modules_to_save": ["lm_head"], **kwargs})


def with_two_adapters(L, m):
    """A set-up: adapters "default" and "b", both saving lm_head."""
    model = with_adapter()(L, m)
    model.add_adapter("b", second(L, modules_to_save=["lm_head"]))
    return model


def second(L, **kwargs):
    return L.LoraConfig(**{"target_modules": ["c_attn"], "fan_in_fan_out": True, **kwargs})


NO_MATCH = peft.utils.NoMatchingPeftModuleError
# HF PEFT's exception classes and ours of the same name
OURS = {NO_MATCH: NoMatchingPeftModuleError}

# (mistake, set-up (None: the bare tiny GPT-2), the mistake made on the set-up's result in library L (the module
# `peft` or `lightning_peft`; `d` a scratch folder), HF PEFT's exception type, a fragment of our message)
SAME_TYPE = [
    (  # ours is a ValueError too (UnknownNameError)
        "unknown peft_type in a file",
        None,
        lambda L, m, d: L.PeftConfig.from_pretrained(config_file(d, {"peft_type": "FOO"})),
        KeyError,
        "unknown peft_type 'FOO'",
    ),
    (  # ours is a FileNotFoundError too (AdapterNotFoundError)
        "config folder missing",
        None,
        lambda L, m, d: L.PeftConfig.from_pretrained(str(d / "nowhere")),
        ValueError,
        "does not exist",
    ),
    (
        "config file without peft_type",
        None,
        lambda L, m, d: L.PeftConfig.from_pretrained(config_file(d, {"r": 8})),
        TypeError,
        "no 'peft_type'",
    ),
    (
        "unknown task_type",
        None,
        lambda L, m, d: L.LoraConfig(task_type="TRANSLATE"),
        ValueError,
        "task_type='TRANSLATE'",
    ),
    ("target_modules=[]", None, lambda L, m, d: lora(L, m, target_modules=[]), NO_MATCH, "target_modules is empty"),
    ("target_modules=''", None, lambda L, m, d: lora(L, m, target_modules=""), NO_MATCH, "is an empty string"),
    ("target_modules=['']", None, lambda L, m, d: lora(L, m, target_modules=[""]), NO_MATCH, "has an empty name"),
    (
        "target_modules matching nothing",
        None,
        lambda L, m, d: lora(L, m, target_modules=["q_proj"]),
        NO_MATCH,
        "matched no module",
    ),
    (
        "a target regex matching nothing",
        None,
        lambda L, m, d: lora(L, m, target_modules=r".*\.q_proj"),
        NO_MATCH,
        "matched no module",
    ),
    (
        "layers_to_transform matching no layer",
        None,
        lambda L, m, d: lora(L, m, layers_to_transform=[7]),
        NO_MATCH,
        r"names layers \[7\] that the model does not have",
    ),
    (
        "every target inside a modules_to_save module",
        None,
        lambda L, m, d: lora(L, m, modules_to_save=["attn"]),
        NO_MATCH,
        "matched no module",
    ),
    (
        "layers_pattern without layers_to_transform",
        None,
        lambda L, m, d: L.LoraConfig(layers_pattern="h"),
        ValueError,
        "layers_pattern only has an effect together with layers_to_transform",
    ),
    (
        "layers_to_transform with a regex target",
        None,
        lambda L, m, d: L.LoraConfig(target_modules=".*c_attn", layers_to_transform=[0]),
        ValueError,
        "layers_to_transform cannot be used when target_modules is a regex",
    ),
    (
        "r=0",
        None,
        lambda L, m, d: lora(L, m, r=0),
        ValueError,
        r"r must be a positive integer \(the LoRA rank\), got 0",
    ),
    ("r=-4", None, lambda L, m, d: lora(L, m, r=-4), ValueError, "got -4"),
    ("r='8' (a string)", None, lambda L, m, d: lora(L, m, r="8"), TypeError, "r must be a positive integer"),
    ("r=2.5", None, lambda L, m, d: lora(L, m, r=2.5), TypeError, "r must be a positive integer"),
    ("lora_alpha='16'", None, lambda L, m, d: lora(L, m, lora_alpha="16"), TypeError, "lora_alpha must be a number"),
    (
        "lora_dropout=1.5",
        None,
        lambda L, m, d: lora(L, m, lora_dropout=1.5),
        ValueError,
        r"must be a number in \[0, 1\)",
    ),
    (
        "lora_dropout='x'",
        None,
        lambda L, m, d: lora(L, m, lora_dropout="x"),
        TypeError,
        "lora_dropout must be a number",
    ),
    (
        "unknown init_lora_weights",
        None,
        lambda L, m, d: lora(L, m, init_lora_weights="xavier"),
        ValueError,
        "init_lora_weights='xavier' is not valid",
    ),
    (
        "target_modules=3",
        None,
        lambda L, m, d: lora(L, m, target_modules=3),
        TypeError,
        "target_modules must be a list",
    ),
    (
        "target_parameters as a string",
        None,
        lambda L, m, d: L.LoraConfig(target_parameters="w"),
        TypeError,
        "target_parameters must be a list",
    ),
    ("eva_config of the wrong type", None, lambda L, m, d: L.LoraConfig(eva_config=3), TypeError, "eva_config must be"),
    ("unknown config argument", None, lambda L, m, d: L.LoraConfig(rank=8), TypeError, "unexpected keyword argument"),
    (
        "IA3 feedforward_modules not among the targets",
        None,
        lambda L, m, d: L.IA3Config(target_modules=["c_attn"], feedforward_modules=["c_proj"]),
        ValueError,
        "feedforward_modules must be a subset of target_modules",
    ),
    (
        "modules_to_save naming a ModuleDict",
        None,
        lambda L, m, d: L.get_peft_model(WithHeads(), L.LoraConfig(target_modules=["lin"], modules_to_save=["heads"])),
        TypeError,
        "'heads', a ModuleDict",
    ),
    (
        "modules_to_save naming a layer another adapter adapts",
        with_adapter(),
        lambda L, m, d: m.add_adapter("b", second(L, target_modules=["c_fc"], modules_to_save=["c_attn"])),
        TypeError,
        "an adapted layer",
    ),
    (
        "add_weighted_adapter of adapters sharing a modules_to_save target",
        with_two_adapters,
        lambda L, m, d: m.add_weighted_adapter(["default", "b"], [1.0, 1.0], "ab"),
        ValueError,
        "target the same module with modules_to_save",
    ),
    (
        "an adapter name taken",
        with_adapter(),
        lambda L, m, d: m.add_adapter("default", second(L)),
        ValueError,
        "'default' already exists",
    ),
    (
        "adapters of two tuners in one model",
        with_adapter(),
        lambda L, m, d: m.add_adapter("b", L.IA3Config(target_modules=["c_fc"], feedforward_modules=[])),
        ValueError,
        "cannot add a IA3 adapter to a LORA model",
    ),
    (
        "two adapters with bias",
        with_adapter(bias="all"),
        lambda L, m, d: m.add_adapter("b", second(L, bias="all")),
        ValueError,
        "only one adapter may train biases",
    ),
    (
        "set_adapter of an unknown name",
        with_adapter(),
        lambda L, m, d: m.set_adapter("nope"),
        ValueError,
        "no adapter named 'nope'",
    ),
    (
        "delete_adapter of an unknown name",
        with_adapter(),
        lambda L, m, d: m.delete_adapter("nope"),
        ValueError,
        "no adapter named 'nope'",
    ),
    (
        "prompt tuning init TEXT without a tokenizer",
        None,
        lambda L, m, d: L.PromptTuningConfig(
            num_virtual_tokens=2, prompt_tuning_init="TEXT", prompt_tuning_init_text="hi"
        ),
        ValueError,
        "needs tokenizer_name_or_path",
    ),
    (
        "tokenizer_kwargs without init TEXT",
        None,
        lambda L, m, d: L.PromptTuningConfig(num_virtual_tokens=2, tokenizer_kwargs={"a": 1}),
        ValueError,
        "tokenizer_kwargs is only used with prompt_tuning_init='TEXT'",
    ),
    (
        "unknown P-tuning encoder",
        None,
        lambda L, m, d: L.get_peft_model(
            m, L.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=2, encoder_reparameterization_type="GRU")
        ),
        ValueError,
        "encoder_reparameterization_type='GRU' is not valid",
    ),
]


def outcome(fn):
    """The exception fn() raises (None if none), every warning silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            fn()
        except Exception as err:  # noqa: BLE001 (the test compares whatever each library raises)
            return err
    return None


def refused_untouched(lib, gpt2, setup, mistake, folder, error, message):
    """Make the mistake in lightning_peft: it raises `error` matching `message`, and the model (as the set-up left
    it) is as before the call."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = copy.deepcopy(gpt2) if setup is None else setup(lib, copy.deepcopy(gpt2))
        before = snapshot(model)
        with pytest.raises(error, match=message):
            mistake(lib, model, folder)
    assert unchanged(model, before), "a refused call must leave the model as it was"


@pytest.mark.parametrize("name,setup,mistake,hf_type,message", SAME_TYPE, ids=[row[0] for row in SAME_TYPE])
def test_the_same_mistake_raises_hf_peft_s_exception_type(tmp_path, gpt2, name, setup, mistake, hf_type, message):
    def hf():
        model = copy.deepcopy(gpt2) if setup is None else setup(peft, copy.deepcopy(gpt2))
        mistake(peft, model, tmp_path)

    hf_error = outcome(hf)
    assert type(hf_error) is hf_type, f"HF PEFT now raises {hf_error!r}: update the table"
    refused_untouched(lp, gpt2, setup, mistake, tmp_path, OURS.get(hf_type, hf_type), message)


# Deliberate differences: HF PEFT raises an exception of a type that says little (an internal crash), a misleading
# one, or nothing (accepting a mistake silently); lightning_peft raises the type a caller would catch for it.
DIFFERS = [
    # (mistake: why, set-up, mistake, what HF PEFT does (an exception type, or None: accepted), our type, message)
    (
        "bias='foo': HF raises NotImplementedError (at injection) for a value that is simply invalid",
        None,
        lambda L, m, d: lora(L, m, bias="foo"),
        NotImplementedError,
        ValueError,
        "bias='foo' is not valid",
    ),
    (
        "lora_dropout=-0.1: HF silently uses no dropout",
        None,
        lambda L, m, d: lora(L, m, lora_dropout=-0.1),
        None,
        ValueError,
        r"lora_dropout must be a number in \[0, 1\)",
    ),
    (
        "target_modules=[3]: HF crashes with AttributeError",
        None,
        lambda L, m, d: lora(L, m, target_modules=[3]),
        AttributeError,
        TypeError,
        "target_modules must be a list",
    ),
    (
        "modules_to_save as a string: HF takes its characters as names",
        None,
        lambda L, m, d: lora(L, m, modules_to_save="lm_head"),
        NO_MATCH,
        TypeError,
        "modules_to_save must be a list",
    ),
    (
        "modules_to_save matching nothing: HF silently saves nothing",
        None,
        lambda L, m, d: lora(L, m, modules_to_save=["nope"]),
        None,
        ValueError,
        "'nope' matches no module",
    ),
    (
        "rank_pattern as a list: HF crashes with AttributeError",
        None,
        lambda L, m, d: lora(L, m, rank_pattern=["c_attn"]),
        AttributeError,
        TypeError,
        "rank_pattern must be a dict",
    ),
    (
        "inference_mode='yes': HF keeps a string as a flag",
        None,
        lambda L, m, d: L.LoraConfig(inference_mode="yes"),
        None,
        TypeError,
        "inference_mode must be True or False",
    ),
    (
        "fan_in_fan_out='x': HF keeps a string as a flag",
        None,
        lambda L, m, d: L.LoraConfig(fan_in_fan_out="x"),
        None,
        TypeError,
        "fan_in_fan_out must be True or False",
    ),
    (
        "LoraConfig.from_pretrained of an IA3 file: HF returns an IA3Config",
        None,
        lambda L, m, d: L.LoraConfig.from_pretrained(
            config_file(d, {"peft_type": "IA3", "target_modules": ["c_attn"]})
        ),
        None,
        ValueError,
        "this config is for peft_type=IA3, not LORA",
    ),
    (
        "num_virtual_tokens=0: HF builds a prompt of no tokens",
        None,
        lambda L, m, d: L.get_peft_model(m, L.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=0)),
        None,
        ValueError,
        "num_virtual_tokens must be a positive integer",
    ),
    (
        "num_virtual_tokens=-1: HF crashes allocating it",
        None,
        lambda L, m, d: L.get_peft_model(m, L.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=-1)),
        RuntimeError,
        ValueError,
        "num_virtual_tokens must be a positive integer",
    ),
    (
        "num_virtual_tokens unset: HF crashes multiplying None",
        None,
        lambda L, m, d: L.get_peft_model(m, L.PromptTuningConfig(task_type="CAUSAL_LM")),
        TypeError,
        ValueError,
        "num_virtual_tokens is None",
    ),
    (
        "prefix tuning num_virtual_tokens=0: HF builds a prefix of no tokens",
        None,
        lambda L, m, d: L.get_peft_model(m, L.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=0)),
        None,
        ValueError,
        "num_virtual_tokens must be a positive integer",
    ),
    (
        "unknown prompt_tuning_init: HF accepts it",
        None,
        lambda L, m, d: L.PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="BOGUS"),
        None,
        ValueError,
        "prompt_tuning_init='BOGUS' is not valid",
    ),
    (
        "adapter name that is a module name ('h'): HF accepts it, and its keys then collide",
        with_adapter(),
        lambda L, m, d: m.add_adapter("h", second(L)),
        None,
        ValueError,
        "adapter name 'h' is a part of the model's paths",
    ),
    (
        "a config dict for get_peft_model: HF crashes with AttributeError",
        None,
        lambda L, m, d: L.get_peft_model(m, {"peft_type": "LORA"}),
        AttributeError,
        TypeError,
        "must be a tuner config",
    ),
]


@pytest.mark.parametrize(
    "name,setup,mistake,hf_type,our_type,message", DIFFERS, ids=[row[0].split(":")[0] for row in DIFFERS]
)
def test_deliberate_differences_in_exception_types(tmp_path, gpt2, name, setup, mistake, hf_type, our_type, message):
    def hf():
        model = copy.deepcopy(gpt2) if setup is None else setup(peft, copy.deepcopy(gpt2))
        mistake(peft, model, tmp_path)

    hf_error = outcome(hf)
    assert (type(hf_error) if hf_error is not None else None) is hf_type, f"HF PEFT now gives {hf_error!r}"
    refused_untouched(lp, gpt2, setup, mistake, tmp_path, our_type, message)


# ---- warnings HF PEFT gives in config and injection --------------------------------------------
@pytest.mark.parametrize("field_name", ["rank_pattern", "alpha_pattern"])
def test_a_rank_or_alpha_pattern_matching_no_target_warns_as_in_hf(gpt2, field_name):
    text = f"The following {field_name} keys did not match any targeted module and were ignored: ['q_proj']."
    for lib in (peft, lp):
        with pytest.warns(RuntimeWarning, match=re.escape(text)):
            lora(lib, copy.deepcopy(gpt2), **{field_name: {"q_proj": 2}})
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a pattern that matches: no warning
        lora(lp, copy.deepcopy(gpt2), **{field_name: {"c_attn": 2}})


def test_layers_to_transform_naming_missing_layers_warns_with_peft_warning(gpt2):
    # HF PEFT adapts layer 1 and says nothing of layer 5; here the missing layer is named (deliberate: a typo in a
    # layer list otherwise goes unnoticed), as a PeftWarning
    with pytest.warns(PeftWarning, match=r"names layers \[5\] .* numbered 0..1; those are skipped"):
        model = lora(lp, copy.deepcopy(gpt2), layers_to_transform=[1, 5])
    assert model.targeted_module_names == ["transformer.h.1.attn.c_attn"]


def test_targets_inside_a_modules_to_save_module_are_not_adapted_as_in_hf(gpt2):
    x = ids()
    logits, adapted = {}, {}
    for lib in (peft, lp):
        model = quiet(lora, lib, copy.deepcopy(gpt2), target_modules=["c_attn", "c_fc"], modules_to_save=["attn"])
        with torch.no_grad():  # the same non-zero LoRA weights in both (the saved copies equal the base)
            for n, p in model.named_parameters():
                if ".lora_" in n:
                    p.copy_(torch.linspace(-0.1, 0.1, p.numel()).reshape(p.shape))
        logits[lib.__name__] = model(x).logits
        adapted[lib.__name__] = sorted(n for n, _ in model.named_parameters() if ".lora_" in n)
    # only c_fc gets LoRA: c_attn is inside `attn`, which is saved whole (HF PEFT's rule)
    assert adapted["peft"] == adapted["lightning_peft"] and not any(".attn." in n for n in adapted["peft"])
    torch.testing.assert_close(logits["peft"], logits["lightning_peft"])
