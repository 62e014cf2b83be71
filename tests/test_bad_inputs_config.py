"""Bad tuner configs: wrong types, values and combinations are refused by the config classes, naming the field."""

from __future__ import annotations

import pytest

import lightning_peft as lp


def test_unknown_tuner():
    with pytest.raises(ValueError, match="unknown peft_type 'LOHA'; lightning_peft knows: LORA, IA3"):
        lp.PeftConfig.from_dict({"peft_type": "LOHA", "r": 8})


def test_config_without_peft_type():
    with pytest.raises(ValueError, match="no 'peft_type'; say which tuner"):
        lp.PeftConfig.from_dict({"r": 8})


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(r="8"), ValueError, "r must be a positive integer"),
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
    with pytest.raises(ValueError) as err:
        lp.LoraConfig(**kwargs)
    assert str(err.value) == message


def test_ia3_feedforward_modules_outside_the_targets():
    with pytest.raises(ValueError) as err:
        lp.IA3Config(target_modules=["q_proj"], feedforward_modules=["down_proj"])
    assert str(err.value) == (
        "feedforward_modules must be a subset of target_modules; ['down_proj'] are not in "
        "target_modules=['q_proj']. Add them to target_modules or drop them from "
        "feedforward_modules"
    )
