"""The Hydra app: `lightning-peft-train [overrides]` (or `python train.py` in a checkout).

Needs the `app` extra (`pip install lightning_peft[app]`: hydra-core, the offline MiniLM, ...). Importing
this package imports neither Hydra nor Lightning; the modules are

- `lightning_peft.app.train`     the job (`train(cfg) -> metrics`) and the entry point `main()`
- `lightning_peft.app.schema`    the structured-config schema, ConfigStore registration, fail-fast key checks
- `lightning_peft.app.report`    the end-of-sweep report (a Hydra callback)
- `lightning_peft.app.multirun`  multirun x DDP: a DDP rank > 0 runs exactly its own job

The configs ship inside the package (`configs/`, `CONFIG_DIR`), and so does the default job's data
(`data/`, `DATA_DIR`). Docs: the README, "The Hydra app".
"""

from __future__ import annotations

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DATA_DIR = Path(__file__).resolve().parent / "data"


def main() -> None:
    """Console entry point (`lightning-peft-train`); see `lightning_peft.app.train.main`."""
    from lightning_peft.app.train import main as _main

    _main()


__all__ = ["CONFIG_DIR", "DATA_DIR", "main"]
