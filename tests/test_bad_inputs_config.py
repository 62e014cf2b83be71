"""Bad tuner configs: wrong types, values and combinations are refused by the config classes, naming the field."""

from __future__ import annotations

import re

import pytest

import lightning_peft as lp


def test_unknown_tuner():
    with pytest.raises(ValueError, match="unknown peft_type 'LOHA'; lightning_peft knows: IA3, LORA, PREFIX_TUNING"):
        lp.PeftConfig.from_dict({"peft_type": "LOHA", "r": 8})


def test_config_without_peft_type():
    with pytest.raises(TypeError, match="no 'peft_type'; say which tuner"):  # a missing key, as in HF PEFT
        lp.PeftConfig.from_dict({"r": 8})


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(r="8"), TypeError, "r must be a positive integer"),
        (dict(lora_alpha="16"), TypeError, "lora_alpha must be a number"),
        (dict(lora_dropout=-0.1), ValueError, r"lora_dropout must be a number in \[0, 1\)"),
        (dict(target_modules=[3]), TypeError, "target_modules must be a list of module names or a regex"),
        (dict(target_modules=""), ValueError, "target_modules is an empty string"),
        (dict(modules_to_save="classifier"), TypeError, "modules_to_save must be a list"),
        (dict(layers_to_transform=["0"], target_modules=["q"]), TypeError, "layers_to_transform must be a layer index"),
        (dict(rank_pattern=["q"]), TypeError, "rank_pattern must be a dict"),
        (dict(alpha_pattern={"[": 2}), ValueError, "alpha_pattern key '\\[' is not a valid regex"),
        (dict(inference_mode="yes"), TypeError, "inference_mode must be True or False"),
    ],
)
def test_wrong_types_and_values(kwargs, error, message):
    with pytest.raises(error, match=message):
        lp.LoraConfig(**kwargs)


def test_config_for_another_tuner_class():
    with pytest.raises(ValueError, match="this config is for peft_type=IA3, not LORA"):
        lp.LoraConfig.from_dict({"peft_type": "IA3", "target_modules": ["q"]})


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(r=0), "r must be a positive integer (the LoRA rank), got 0"),
        (dict(r=-2), "r must be a positive integer (the LoRA rank), got -2"),
        (dict(lora_dropout=1.0), "lora_dropout must be a number in [0, 1), got 1.0"),
        (
            dict(target_modules="(q"),
            "target_modules='(q' is not a valid regex (missing ), unterminated subpattern at position 0)",
        ),
        (dict(target_modules=[]), "target_modules is empty; name at least one module (e.g. ['q_proj', 'v_proj'])"),
        (
            dict(target_modules=".*q_proj", layers_to_transform=[0]),
            "layers_to_transform cannot be used when target_modules is a regex string; give target_modules as a list",
        ),
        (
            dict(target_modules=["q_proj"], layers_pattern="layers"),
            "layers_pattern only has an effect together with layers_to_transform; set both",
        ),
        (dict(bias="some"), "bias='some' is not valid; use one of: 'none', 'all', 'lora_only'"),
        (
            dict(task_type="NOPE"),
            "task_type='NOPE' is not valid; use one of: CAUSAL_LM, SEQ_2_SEQ_LM, SEQ_CLS, "
            "TOKEN_CLS, QUESTION_ANS, FEATURE_EXTRACTION",
        ),
    ],
)
def test_lora_config_values_out_of_range_or_conflicting(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        lp.LoraConfig(**kwargs)


def test_ia3_feedforward_modules_outside_the_targets():
    with pytest.raises(ValueError, match=r"feedforward_modules must be a subset of target_modules; \['down_proj'\]"):
        lp.IA3Config(target_modules=["q_proj"], feedforward_modules=["down_proj"])


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(lora_alpha=NAN), "lora_alpha must be a finite number, got nan"),
        (dict(lora_alpha=-INF), "lora_alpha must be a finite number, got -inf"),
        (dict(lora_dropout=NAN), "lora_dropout must be a finite number, got nan"),
        (dict(alpha_pattern={"c_attn": INF}), r"alpha_pattern\['c_attn'\] must be a finite number, got inf"),
        (dict(alpha_pattern={"c_attn": "16"}), r"alpha_pattern\['c_attn'\] must be a number, got '16'"),
    ],
)
def test_non_finite_numbers_are_refused(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        lp.LoraConfig(**kwargs)


def test_non_finite_numbers_in_a_config_file_are_refused(saved_adapter):
    from helpers import edit_config, load_fails

    base, folder = saved_adapter
    edit_config(folder, lora_alpha=NAN)  # json writes NaN, and reads it back
    load_fails(base, folder, "lora_alpha must be a finite number, got nan")


def test_p_tuning_dropout_nan_is_refused():
    with pytest.raises(ValueError, match="encoder_dropout must be a number in"):
        lp.PromptEncoderConfig(num_virtual_tokens=2, encoder_dropout=NAN)


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: lp.LoraConfig(target_modules="(.*.*)*c_attnX"), "target_modules='.*' repeats a group"),
        (lambda: lp.LoraConfig(target_modules="(qa|q)+_proj"), "repeats a group that itself repeats or alternates"),
        (lambda: lp.IA3Config(target_modules=".*", feedforward_modules="(a*)*"), "feedforward_modules='.*' repeats"),
        (lambda: lp.LoraConfig(rank_pattern={".*" * 5: 2}), "rank_pattern key '.*' has 5 variable-length"),
    ],
)
def test_regexes_that_could_hang_matching(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize(
    "pattern", [r".*\.(q_proj|v_proj)", r"(.*\.)?layers\.\d+\.(attn|mlp)\..*", r"model\.h\.\d{1,3}\.c_attn", "q_proj"]
)
def test_ordinary_regexes_still_pass(pattern):
    assert lp.LoraConfig(target_modules=pattern, rank_pattern={pattern: 4}).target_modules == pattern


def test_short_repr_cuts_long_values():
    from lightning_peft.config import short_repr

    assert short_repr("abc") == "'abc'"
    assert short_repr("x" * 200, 20) == "'xxxxxxxxxxxxxxxx... (202 characters)"
    with pytest.raises(TypeError, match=r"r must be a positive integer \(the LoRA rank\), got \[0, 0, .*characters\)$"):
        lp.LoraConfig(r=[0] * 1000)


# Patterns known to backtrack catastrophically (nested repeats, alternations under a repeat, repeats hidden in a
# conditional group, a lookaround or an atomic group, backreferences): each is refused, at once, in every field.
CATASTROPHIC = [
    r"()(?(1)(.+)+!)",  # a nested repeat inside a conditional group: hung from_pretrained
    r"(?:x)?(?(1)a|(.*)*!)",
    r"(a+)+$",
    r"(a*)*b",
    r"(a|aa)+$",
    r"(?:a|b|ab)*c",
    r"(.*a){12}",
    r"(x+x+)+y",
    r"(\w+\s?)+$",
    r"((a+)b?)+c",
    r"(a?){25}a{25}",
    r"(?=(a+)+)b",
    r"(?!(a*)*b)c",
    r"(?>(a+)+)!",
    r"(a++)+b",
    r"(?:(?>a+))+b",
    r"(a)\1",
    r"(?P<x>a)(?P=x)+",
    r".*.*.*.*.*x",
]


@pytest.mark.parametrize("pattern", CATASTROPHIC)
@pytest.mark.parametrize(
    "make",
    [
        lambda p: lp.LoraConfig(target_modules=p),
        lambda p: lp.LoraConfig(target_modules=["q"], rank_pattern={p: 2}),
        lambda p: lp.LoraConfig(target_modules=["q"], alpha_pattern={p: 2.0}),
        lambda p: lp.IA3Config(target_modules=".*", feedforward_modules=p),
    ],
    ids=["target_modules", "rank_pattern", "alpha_pattern", "feedforward_modules"],
)
def test_catastrophic_regexes_are_refused_at_once(make, pattern):
    import time

    start = time.perf_counter()
    with pytest.raises(
        ValueError, match="repeats a group that itself repeats|variable-length repetitions|uses a (conditional|backref)"
    ):
        make(pattern)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize(
    "pattern,message",
    [
        (r"()(?(1)(.+)+!)", r"uses a conditional group '\(\?\(1\)\.\.\.\)', which module names never need"),
        (r"(a)\1", "uses a backreference, which module names never need"),
        (r"(?>(a+)+)!", "repeats a group that itself repeats"),  # inside an atomic group
        (r"(?=(a+)+)b", "repeats a group that itself repeats"),  # inside a lookahead
    ],
)
def test_repeats_hidden_in_any_kind_of_group_are_found(pattern, message):
    with pytest.raises(ValueError, match=message):
        lp.LoraConfig(target_modules=pattern)


@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern"])
def test_a_global_inline_flag_in_a_pattern_key_is_refused_naming_the_field(field):
    # the key is matched inside `(.*\.)?(key)$`, where a global flag is a bare re.error at adapter creation
    with pytest.raises(
        ValueError, match=rf"{field} key '\(\?i\)q_proj' cannot be used as a key .*use a scoped flag group"
    ):
        lp.LoraConfig(target_modules=["q_proj"], **{field: {"(?i)q_proj": 2}})
    assert lp.LoraConfig(target_modules=["q_proj"], **{field: {"(?i:Q_PROJ)": 2}})  # the scoped form passes


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: lp.LoraConfig(r=2**40), r"r=1099511627776 is above 1048576 \(2\*\*20\)"),
        (lambda: lp.LoraConfig(rank_pattern={"q": 2**21}), r"rank_pattern\['q'\]=2097152 is above 1048576"),
        (
            lambda: lp.PromptTuningConfig(num_virtual_tokens=2**40),
            r"num_virtual_tokens=1099511627776 is above 1048576 \(2\*\*20\)",
        ),
        (
            lambda: lp.PromptEncoderConfig(num_virtual_tokens=4, encoder_num_layers=10**7),
            "encoder_num_layers must be a positive integer of at most 64, got 10000000",
        ),
    ],
)
def test_absurd_sizes_are_refused_whatever_the_weights(make, message):
    with pytest.raises(ValueError, match=message):
        make()
