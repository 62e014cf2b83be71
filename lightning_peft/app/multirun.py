"""Multirun x DDP: Hydra sweeps whose jobs use a multi-process strategy (DDP, FSDP).

Lightning's subprocess launcher starts ranks > 0 by re-running the command line. Inside a multirun
that command line is the whole sweep, so without the handling here every rank 1 would run a sweep
of its own. `ddp_children_run_this_job_only()` wraps one job so that a rank > 0 runs exactly that job,
in that job's output dir, and the next job of the sweep launches afresh.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator

from omegaconf import open_dict, read_write

# Environment variables Lightning's subprocess launcher sets in the *launching* process; left over,
# they make the next job of a multirun think its ranks were started externally.
_DDP_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "PL_GLOBAL_SEED", "PL_SEED_WORKERS")


def _hydra_options(argv: list[str]) -> list[str]:
    """The command-line options other than overrides and -m/--multirun (e.g. --config-dir X)."""
    from .._compat import hydra_args_parser

    args = hydra_args_parser().parse_args(argv)
    out: list[str] = []
    for flag, value in (
        ("--config-path", args.config_path),
        ("--config-name", args.config_name),
        ("--config-dir", args.config_dir),
    ):
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
