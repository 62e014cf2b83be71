"""The app's job and entry point: `lightning-peft-train [overrides]` (or `python train.py` in a checkout).

`train(cfg)` builds the recipe's model, tokenizer, LightningModule and DataModule, applies the tuner
through `PEFTCallback`, validates before and after fitting, and leaves in the run dir:
`adapter/` (HF PEFT format), `merged/`, `checkpoints/`, `logs/` and `metrics.json`.
The configs ship in the package (`lightning_peft/app/configs/`); docs in the README, "The Hydra app".
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from lightning_peft._files import atomic_write_text
from lightning_peft.app import CONFIG_DIR
from lightning_peft.app.multirun import ddp_children_run_this_job_only

log = logging.getLogger("lightning_peft.app")


def _offline_by_default() -> None:
    """The app's default needs no network: `HF_HUB_OFFLINE=1` unless set (`HF_HUB_OFFLINE=0 python train.py
    model.name_or_path=<hub name>` downloads). huggingface_hub reads it once, when first imported (importing
    Lightning imports it, through torchmetrics and transformers), so `main()` calls this before anything
    imports them; importing this module imports neither, and leaves the environment alone."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


# ---------------------------------------------------------------- measurements
class PeakMemory:
    """Peak resident memory of this process while a job runs (sampled; ru_maxrss only ever grows,
    so it cannot tell jobs of one multirun apart), plus CUDA's own peak when on GPU."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):  # not Linux: lifetime peak is the best we have
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakMemory":
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())

    def report(self) -> dict[str, float]:
        import torch

        out = {"peak_rss_mb": round(self.peak / 2**20, 1)}
        if torch.cuda.is_available():
            out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        return out


# ---------------------------------------------------------------- the job
def _run_dir(cfg: DictConfig) -> Path:
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(cfg.trainer.get("default_root_dir") or "outputs/app")


def _job_info() -> dict[str, Any]:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {"choices": {}, "overrides": [], "job_num": None, "mode": "no hydra"}
    hc = HydraConfig.get()
    choices = {k: v for k, v in hc.runtime.choices.items() if not k.startswith("hydra/") and v is not None}
    return {
        "choices": choices,
        "overrides": list(hc.overrides.task),
        "job_num": hc.job.get("num"),
        "mode": str(hc.mode.name).lower(),
    }


def _check_strategy(cfg: DictConfig) -> None:
    import torch

    if cfg.strategy.get("requires_gpu") and not torch.cuda.is_available():
        target = OmegaConf.select(cfg, "strategy.lightning._target_", default=str(cfg.strategy.lightning))
        raise RuntimeError(
            f"this strategy ({target.rsplit('.', 1)[-1]}, FSDP1) needs CUDA GPUs and none is available; "
            "on CPU use `strategy=fsdp` (FSDP2 through ModelParallelStrategy)"
        )


def _flatten(metrics: list[dict[str, Any]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for d in metrics or []:
        out.update({k: float(v) for k, v in d.items()})
    return out


def tuner_config(cfg: DictConfig) -> Any:
    """The tuner config object (e.g. `LoraConfig`) `cfg.tuner` builds. The tuner's YAML also carries its
    optimiser defaults under `optim:` (read by the recipe's module as `${tuner.optim.lr}`, ...); they are
    no argument of the tuner config, so they are left out here."""
    from hydra.utils import instantiate

    node = OmegaConf.to_container(cfg.tuner, resolve=True)
    if not isinstance(node, dict):
        raise TypeError(f"tuner: expected a config node with _target_, got {node!r}")
    node.pop("optim", None)
    return instantiate(node, _convert_="all")


def check_tuner_trains_head(tuner: Any, cfg: DictConfig) -> None:
    """A classification recipe builds a new, random task head that only the tuner config's `modules_to_save` can
    train: refuse a tuner config without that field (e.g. `TrainableTokensConfig`, as in HF PEFT) before any model
    is built, rather than train a model whose head stays random."""
    task = str(OmegaConf.select(cfg, "recipe.task_type", default="") or "")
    if task in ("SEQ_CLS", "TOKEN_CLS") and not hasattr(tuner, "modules_to_save"):
        choice = str(cfg.tuner.get("_target_", "")).rsplit(".", 1)[-1]
        raise ValueError(
            f"{choice} cannot train the new classifier head of a {task} recipe: it has no modules_to_save (as in HF "
            "PEFT), so the head would stay random. Use it with recipe=causal_lm or recipe=seq2seq, or train new "
            "tokens of a classifier with tuner=lora +tuner.trainable_token_indices=[...]"
        )


def check_loraplus_tuner(tuner: Any, cfg: DictConfig) -> None:
    """LoRA+ (`loraplus_lr_ratio`) gives lora_B a larger learning rate: refuse it with a tuner that has no lora_B
    before any model is built (the module's `configure_optimizers` would refuse it only after setup)."""
    ratio = OmegaConf.select(cfg, "recipe.module.loraplus_lr_ratio", default=None)
    peft_type = getattr(tuner, "peft_type", None)
    if ratio is not None and peft_type != "LORA":
        raise ValueError(
            f"loraplus_lr_ratio={ratio} is LoRA+, which needs a LoRA adapter (lora_B); the {peft_type} tuner has "
            "none: use tuner=lora, or drop tuner.optim.loraplus_lr_ratio"
        )


def build(cfg: DictConfig) -> dict[str, Any]:
    """The objects one run uses, without a Trainer: tokenizer, model, module, datamodule, tuner config."""
    from hydra.utils import instantiate

    from lightning_peft.recipes.common import build_model, check_local_path, check_model_folder, load_tokenizer

    m = cfg.model
    tuner = tuner_config(cfg)
    check_tuner_trains_head(tuner, cfg)
    check_loraplus_tuner(tuner, cfg)
    quantize = None if cfg.quantize is None else str(getattr(cfg.quantize, "value", cfg.quantize))  # int8 / int4
    if quantize is not None:  # refuse a tuner that cannot run (or merge) over quantized layers before training
        from lightning_peft.quantization import check_quantized_compatible

        check_quantized_compatible(tuner, merge=cfg.merge, kind=quantize)
    for field in ("name_or_path", "tokenizer"):
        if m.get(field):
            check_local_path(m[field], f"model.{field}")
    if m.get("name_or_path"):
        check_model_folder(m.name_or_path, "model.name_or_path")
    tokenizer = load_tokenizer(m.get("tokenizer") or m.name_or_path)
    model = build_model(
        cfg.recipe.auto_class,
        name_or_path=m.name_or_path,
        config=OmegaConf.to_container(m.config, resolve=True) if m.get("config") else None,
        tokenizer=tokenizer,
        **OmegaConf.to_container(cfg.recipe.model_kwargs, resolve=True),
    )
    if quantize is not None:  # 8-/4-bit base layers before the tuner is injected (the adapter stays in full precision)
        from lightning_peft.quantization import quantize_base_linears

        skip = getattr(tuner, "modules_to_save", None) or ()
        model = quantize_base_linears(model, skip=skip, bits=4 if quantize == "int4" else 8)
    module = instantiate(cfg.recipe.module, model=model, tokenizer=tokenizer)
    datamodule = instantiate(cfg.data, tokenizer=tokenizer)
    return {"tokenizer": tokenizer, "model": model, "module": module, "datamodule": datamodule, "tuner": tuner}


def train(cfg: DictConfig) -> dict[str, Any]:
    """One training job. Returns (and on rank 0 writes to `<run dir>/metrics.json`) the metrics."""
    import lightning.pytorch as pl
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from lightning_peft.lightning import PEFTCallback
    from lightning_peft.lightning.strategies import parameter_counts

    _log_each_line_once()
    start = time.perf_counter()
    run_dir = _run_dir(cfg)
    job = _job_info()
    log.info(
        "rank %s (pid %d, %s) starts in %s with overrides %s",
        os.environ.get("LOCAL_RANK", "0"),
        os.getpid(),
        job["mode"],
        run_dir,
        job["overrides"],
    )
    from lightning_peft.app.schema import check_values

    check_values(cfg)  # main() checked the command line's values; this also covers train(cfg) called directly
    _check_strategy(cfg)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)

    with PeakMemory() as memory, ddp_children_run_this_job_only():
        parts = build(cfg)
        module, datamodule = parts["module"], parts["datamodule"]
        counts: dict[str, int] = {}

        class _CountParams(pl.Callback):  # after injection, before the optimizer sees the params
            def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
                counts["trainable"], counts["total"] = parameter_counts(pl_module)

        monitor, mode = cfg.recipe.monitor, cfg.recipe.mode
        checkpoint = ModelCheckpoint(
            dirpath=run_dir / "checkpoints",
            monitor=monitor,
            mode=mode,
            save_top_k=1,
            save_last=True,
            filename="best-{epoch}-{step}",
        )
        peft_callback = PEFTCallback(  # the tokenizer goes into adapter/ and merged/ before they are put in place
            parts["tuner"],
            model_attr="model",
            merge_on_train_end=cfg.merge,
            export_dir=str(run_dir),
            export_extras=parts["tokenizer"].save_pretrained,  # each folder then loads on its own
        )
        callbacks = [peft_callback, _CountParams(), checkpoint]
        trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
        if trainer_kwargs.get("callbacks"):
            callbacks += [instantiate(c) for c in trainer_kwargs["callbacks"]]
        trainer_kwargs["callbacks"] = callbacks
        if isinstance(trainer_kwargs.get("strategy"), dict):
            trainer_kwargs["strategy"] = instantiate(trainer_kwargs["strategy"])
        if trainer_kwargs.get("logger") in (None, True):
            trainer_kwargs["logger"] = CSVLogger(save_dir=str(run_dir), name="logs", version="")
        trainer_kwargs["default_root_dir"] = trainer_kwargs.get("default_root_dir") or str(run_dir)
        trainer = pl.Trainer(**trainer_kwargs)

        before = None
        if cfg.validate_before and cfg.ckpt_path is None:  # on resume "before" would be a fresh adapter
            before = _flatten(trainer.validate(module, datamodule=datamodule, verbose=False))
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
        after = _flatten(trainer.validate(module, datamodule=datamodule, verbose=False))

    metrics: dict[str, Any] = {
        **_job_fields(job),
        "monitor": monitor,
        "metric": after.get(monitor),
        "before": before,
        "after": after,
        "trainable_params": counts.get("trainable"),
        "total_params": counts.get("total"),
        "global_step": trainer.global_step,
        "resumed_from": cfg.ckpt_path,
        "wall_time_s": round(time.perf_counter() - start, 2),
        **memory.report(),
        "world_size": trainer.world_size,
        "best_checkpoint": checkpoint.best_model_path or None,
        "last_checkpoint": checkpoint.last_model_path or None,
        "sample": getattr(module, "sample", None),
    }
    if trainer.is_global_zero:
        # a temporary file renamed into place: a killed job leaves no half-written metrics.json for the report
        atomic_write_text(str(run_dir / "metrics.json"), json.dumps(metrics, indent=2) + "\n")
        name = monitor.removeprefix("val_")
        if before is not None:
            log.info("validation %s before: %.4f", name, before.get(monitor, float("nan")))
        log.info(
            "validation %s after:  %.4f  (%d trainable of %d parameters, %.1f s)",
            name,
            after.get(monitor, float("nan")),
            counts.get("trainable", 0),
            counts.get("total", 0),
            metrics["wall_time_s"],
        )
    return metrics


# ---------------------------------------------------------------- console output
def _log_each_line_once() -> None:
    """Lightning's lines once, through Hydra's handlers. The `lightning` logger always has a console
    handler of its own, and `lightning.pytorch`/`lightning.fabric` propagate to the root logger (which
    Hydra gives a console handler and the job's log file) when the root had handlers at their import;
    so each Lightning INFO line printed twice. When they were imported before Hydra configured logging
    (e.g. by the key checks), they hold a console handler of their own and don't propagate, which kept
    them out of the job's log file. With Hydra's handlers on the root logger, drop Lightning's console
    handlers and let every Lightning logger propagate. Without them (no Hydra) nothing changes."""
    root = logging.getLogger()
    if not root.handlers:
        return
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        console = [h for h in logger.handlers if type(h) is logging.StreamHandler]  # not a FileHandler
        for handler in console:
            logger.removeHandler(handler)
        if console and name != "lightning":
            logger.propagate = True


# ---------------------------------------------------------------- entry points
FAILED_JOBS: list[str] = []  # "job <n> (<overrides>): <error>" for each failed job of this process's multirun


def _job_fields(job: dict[str, Any]) -> dict[str, Any]:
    """What identifies a job in its metrics.json and the sweep report: its choices, overrides and number."""
    return {
        **{group: job["choices"].get(group) for group in ("tuner", "strategy", "recipe", "model")},
        "overrides": job["overrides"],
        "job_num": job["job_num"],
    }


def _error_text(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


def record_failed_job(cfg: DictConfig, err: BaseException) -> None:
    """A multirun job that raised: its error goes to the job's log (with the traceback) and to its
    `metrics.json` (`{"error": ..., "overrides": ..., ...}`, no metric), so the sweep report lists it as
    failed, and into FAILED_JOBS, so the process exits non-zero once the other jobs and the report are done."""
    job = _job_info()
    log.error("job %s failed (overrides %s)", job["job_num"], job["overrides"], exc_info=err)
    FAILED_JOBS.append(f"job {job['job_num']} ({' '.join(job['overrides'])}): {_error_text(err)}")
    if os.environ.get("LOCAL_RANK", "0") != "0":
        return
    record = {"error": _error_text(err), **_job_fields(job), "metric": None}
    try:
        run_dir = _run_dir(cfg)
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(str(run_dir / "metrics.json"), json.dumps(record, indent=2) + "\n")
    except OSError as write_err:  # the report still lists the job (as failed: no metrics.json)
        log.error("could not record the failure in %s: %s", run_dir, write_err)


def _hydra_entry() -> Any:
    import hydra

    @hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
    def _main(cfg: DictConfig) -> Optional[float]:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.get().mode != RunMode.MULTIRUN:
            return train(cfg)["metric"]  # returned so Hydra sweepers can optimise it
        # Hydra's BasicSweeper re-raises a job's exception, ending the sweep without the other jobs or the
        # report: a failed job is recorded instead, and main() exits non-zero after the sweep
        try:
            return train(cfg)["metric"]
        except Exception as err:
            record_failed_job(cfg, err)
            return None

    return _main()


def main() -> None:
    """Console entry (`lightning-peft-train`, `python train.py`): register the configs' schema with
    Hydra's ConfigStore, validate the command line's keys first, so a misspelled key fails at once with
    the valid ones listed, then hand over to Hydra."""
    _offline_by_default()  # before anything imports huggingface_hub
    from lightning_peft.app.schema import ConfigValueError, UnknownKeyError, check_command_line, register_configs

    register_configs()
    try:
        check_command_line(sys.argv[1:])
    except (UnknownKeyError, ConfigValueError) as err:
        print(f"Error: {err}", file=sys.stderr)
        sys.exit(2)
    _hydra_entry()
    if FAILED_JOBS:  # a multirun with failed jobs: the others ran and the report lists them all
        print(f"Error: {len(FAILED_JOBS)} job(s) of the multirun failed:", file=sys.stderr)
        for line in FAILED_JOBS:
            print(f"  {line}", file=sys.stderr)
        sys.exit(1)
