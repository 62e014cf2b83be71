"""The tuner hooks generic code calls for what only some tuners do (LoRA's PiSSA / OLoRA / LoftQ change the base
weights): the neutral defaults of every other tuner, and that the generic modules reach no tuner's internals."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
import torch
from helpers import tiny_gpt2

import lightning_peft as lp
from lightning_peft.tuners.base import TunerAttributes
from lightning_peft.tuners.registry import registered_tuners

PACKAGE = Path(lp.__file__).parent
# the modules every tuner goes through: they may name tuners.base / tuners.registry, never one tuner's folder
GENERIC = ["peft_model.py", "serialization.py", "mapping.py", "mapping_func.py", "config.py", "status.py", "auto.py"]


@pytest.mark.parametrize("module", GENERIC)
def test_generic_modules_import_no_tuner_folder(module):
    tree = ast.parse((PACKAGE / module).read_text())
    imported = [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    tuner_folders = [
        name for name in imported if name.startswith("tuners.") and name.split(".")[1] not in {"base", "registry"}
    ]
    assert tuner_folders == []


def test_every_registered_tuner_has_the_hooks():
    for spec in registered_tuners().values():
        assert issubclass(spec.model_class, TunerAttributes), spec.model_class


@pytest.mark.parametrize(
    "config",
    [
        lambda: lp.IA3Config(target_modules=["c_attn"], feedforward_modules=[]),
        lambda: lp.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2),
    ],
    ids=["ia3", "prompt_tuning"],
)
def test_weight_conversion_refused_by_other_tuners_before_writing(tmp_path, config):
    model = lp.get_peft_model(tiny_gpt2(), config())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    (tmp_path / "init").mkdir()
    with pytest.raises(ValueError, match="path_initial_model_for_weight_conversion converts LoRA adapters; 'default'"):
        model.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "init")
    assert not os.path.exists(tmp_path / "out")
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    model.save_pretrained(tmp_path / "plain")  # without it the save works as always
    assert (tmp_path / "plain" / "adapter_model.safetensors").is_file()
