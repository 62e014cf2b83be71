"""LightningCLI (jsonargparse) configures PEFTCallback and a PEFTMixin module from YAML and the command line:
examples/cli/ run end to end (as `python examples/cli/main.py fit ...` in a child process), nested fields of the
tuner config overridden on the command line, typed and misspelled fields refused with their name."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from helpers import run_forked

pytest.importorskip("jsonargparse")

from lightning.pytorch.cli import LightningCLI  # noqa: E402

from lightning_peft import IA3Config, LoraConfig  # noqa: E402
from lightning_peft.lightning import PEFTCallback  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    # Lightning 2.6's LightningCLI calls jsonargparse 4.53 APIs deprecated since 4.49 (not ours to change)
    pytest.mark.filterwarnings("ignore:(?s).*deprecated in v4\\.49:DeprecationWarning"),
]

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "cli"
CALLBACK_R = "--trainer.callbacks.init_args.config.init_args.r"  # a nested field of the callback's LoraConfig
MIXIN_R = "--model.init_args.peft_config.init_args.r"  # the same field of a PEFTMixin module's peft_config


@pytest.fixture(scope="module")
def example():
    """examples/cli/main.py imported as a module (for parse-only runs in this process)."""
    spec = importlib.util.spec_from_file_location("lightning_peft_cli_example", EXAMPLE / "main.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # jsonargparse resolves the example's class names through their module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def _parse(example, *args):
    """LightningCLI built from examples/cli/config.yaml and `args`, without running a subcommand."""
    args = ["--config", str(EXAMPLE / "config.yaml"), *args]
    return LightningCLI(datamodule_class=example.RandomTokens, args=args, run=False, save_config_callback=None)


def _fit(tmp_path, config: str, override: str):
    """examples/cli/main.py `fit` for 2 steps in a child process, run in `tmp_path`."""
    command = [EXAMPLE / "main.py", "fit", "--config", EXAMPLE / config, "--trainer.max_steps=2", override]
    return run_forked(command, cwd=tmp_path, timeout=120)


def _peft_callback(cli) -> PEFTCallback:
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, PEFTCallback)]
    return callback


def test_fit_with_the_callback_and_a_nested_override(tmp_path):
    result = _fit(tmp_path, "config.yaml", f"{CALLBACK_R}=2")
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((tmp_path / "cli_runs" / "lora_export" / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == 2  # the command line's value ...
    assert saved["lora_alpha"] == 16 and saved["target_modules"] == ["c_attn"]  # ... over the YAML's other fields
    assert (tmp_path / "cli_runs" / "lora_export" / "merged" / "config.json").is_file()
    assert "trainable params 512 of" in result.stderr  # r=2 on c_attn (32 -> 96) in 2 layers: 2 * 2 * (32 + 96)


def test_fit_with_a_mixin_module_configured_the_same_way(tmp_path):
    result = _fit(tmp_path, "mixin.yaml", f"{MIXIN_R}=4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LORA adapter 'default' on `model`: trainable params 1,024 of" in result.stderr  # r=4
    written = (tmp_path / "cli_runs" / "config.yaml").read_text()  # LightningCLI's record of the run holds the override
    assert "peft_config:" in written and "\n      r: 4\n" in written


def test_a_misspelled_field_on_the_command_line_is_named(tmp_path):
    result = _fit(tmp_path, "config.yaml", f"{CALLBACK_R}r=2")
    assert result.returncode != 0
    assert "Option 'rr' is not accepted" in result.stderr
    assert not (tmp_path / "cli_runs" / "lora_export").exists()  # refused before anything ran


def test_parsed_configs_are_typed_tuner_configs(example, tmp_path, capsys):
    cli = _parse(example, f"{CALLBACK_R}=3", "--trainer.callbacks.init_args.config.init_args.target_modules=[c_attn]")
    config = _peft_callback(cli).config
    assert isinstance(config, LoraConfig) and config.r == 3 and config.lora_alpha == 16
    assert config.target_modules == {"c_attn"} and config.task_type == "CAUSAL_LM" and config.fan_in_fan_out
    assert type(cli.model).__name__ == "TinyLM"

    # another tuner by class path, its own fields
    ia3 = (
        "--trainer.callbacks.init_args.config={class_path: lightning_peft.IA3Config, "
        "init_args: {target_modules: [c_attn], feedforward_modules: []}}"
    )
    config = _peft_callback(_parse(example, ia3)).config
    assert isinstance(config, IA3Config) and config.target_modules == {"c_attn"}

    # a value of the wrong type, and a misspelled field in YAML, stop the parse naming the field
    with pytest.raises(SystemExit):
        _parse(example, f"{CALLBACK_R}=two")
    assert 'Parser key "r"' in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning_peft.lightning.PEFTCallback\n      init_args:\n"
        "        config:\n          class_path: lightning_peft.LoraConfig\n          init_args: {lora_alpah: 32}\n"
    )
    with pytest.raises(SystemExit):
        _parse(example, "--config", str(bad))
    assert "Option 'lora_alpah' is not accepted" in capsys.readouterr().err


def test_the_cli_type_offers_every_registered_tuner_config():
    """jsonargparse takes each listed config class itself: a tuner registered in this package but missing from
    `TunerConfig` could not be configured from YAML."""
    from typing import get_args

    from lightning_peft.lightning.types import TunerConfig
    from lightning_peft.tuners.registry import registered_tuners

    missing = {spec.config_class for spec in registered_tuners().values()} - set(get_args(TunerConfig))
    assert not missing, f"add to lightning_peft/lightning/types.py TunerConfig: {sorted(c.__name__ for c in missing)}"
