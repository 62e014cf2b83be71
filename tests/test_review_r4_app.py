"""Final review (R4): the LoRA+ ratio set on the recipe module directly is checked before training."""

from __future__ import annotations

import pytest


def test_loraplus_ratio_set_on_the_recipe_module_is_checked_before_training():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from lightning_peft.app import CONFIG_DIR
    from lightning_peft.app.schema import ConfigValueError, check_values, register_configs

    register_configs()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["recipe.module.loraplus_lr_ratio=16"])
    check_values(cfg)
    for value in (float("nan"), float("inf"), -1.0, 0, "abc"):
        OmegaConf.update(cfg, "recipe.module.loraplus_lr_ratio", value)
        with pytest.raises(ConfigValueError, match=r"recipe\.module\.loraplus_lr_ratio=.*must be a finite number > 0"):
            check_values(cfg)


def test_loraplus_ratio_with_a_tuner_without_lora_b_is_refused_before_any_model_is_built(monkeypatch):
    from hydra import compose, initialize_config_dir

    import lightning_peft.recipes.common as common
    from lightning_peft.app import CONFIG_DIR
    from lightning_peft.app.schema import register_configs
    from lightning_peft.app.train import build, check_loraplus_tuner, tuner_config

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(common, "build_model", no_model)
    register_configs()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["tuner=ia3", "+tuner.optim.loraplus_lr_ratio=16"])
        lora = compose("train", overrides=["tuner=lora", "tuner.optim.loraplus_lr_ratio=16"])
    with pytest.raises(ValueError, match=r"loraplus_lr_ratio=16.* IA3 tuner has none: use tuner=lora"):
        build(cfg)
    check_loraplus_tuner(tuner_config(lora), lora)
