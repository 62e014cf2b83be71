"""Checkpoint bytes vs adapter parameter bytes.

    python bench/bench_checkpoint.py

- `save_pretrained` (adapter_model.safetensors, and the whole folder with adapter_config.json), ours
  and peft;
- Lightning checkpoints written by `ModelCheckpoint` during a `Trainer.fit` with `PEFTCallback`:
  weights-only (`save_weights_only=True`), and full (with the AdamW state needed to resume, which is
  two more tensors per adapter tensor by construction).
"""

from __future__ import annotations

import argparse
import glob
import os
import tempfile

import torch
from common import BATCH, MODELS, _quiet, build_case, cpu_trainer, have_peft, lora_kwargs, make_optimizer
from torch.utils.data import DataLoader

KIB = 1024


def adapter_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def folder_bytes(path: str) -> int:
    return sum(
        os.path.getsize(f) for f in glob.glob(os.path.join(path, "**", "*"), recursive=True) if os.path.isfile(f)
    )


def saved(kind: str, arch: str) -> dict:
    model = build_case(kind, arch)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        return {
            "params": adapter_bytes(model),
            "safetensors": os.path.getsize(os.path.join(tmp, "adapter_model.safetensors")),
            "folder": folder_bytes(tmp),
        }


def lightning_checkpoints(arch: str) -> dict:
    import lightning.pytorch as pl
    from bench_trainer import dataset
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_peft import LoraConfig
    from lightning_peft.lightning import PEFTCallback

    class LM(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = MODELS[arch][0](0)

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch[0], labels=batch[0]).loss

        def configure_optimizers(self):
            return make_optimizer(self)

    out = {}
    for name, weights_only in (("weights", True), ("full", False)):
        with tempfile.TemporaryDirectory() as tmp, _quiet():
            module = LM()
            checkpoint = ModelCheckpoint(
                dirpath=os.path.join(tmp, "ckpt"), save_weights_only=weights_only, every_n_train_steps=1
            )
            config = LoraConfig(task_type="CAUSAL_LM", **lora_kwargs(arch, 0.0))
            trainer = cpu_trainer(
                tmp,
                max_steps=1,
                enable_checkpointing=True,
                callbacks=[PEFTCallback(config, merge_on_train_end=False, export_dir=tmp), checkpoint],
            )
            trainer.fit(module, DataLoader(dataset(1), batch_size=BATCH))
            out["params"] = adapter_bytes(module)
            (path,) = glob.glob(os.path.join(tmp, "ckpt", "*.ckpt"))
            out[name] = os.path.getsize(path)
    return out


def run(arch: str = "gpt2", log=print) -> dict:
    log(f"[checkpoint] {arch}")
    results = {"ours": saved("ours", arch), "lightning": lightning_checkpoints(arch)}
    if have_peft():
        results["peft"] = saved("peft", arch)
    return results


def rows(arch: str, r: dict) -> list[dict]:
    out = []

    def add(metric: str, size: int, params: int, target: bool, detail: str = "") -> None:
        out.append(
            dict(
                section="checkpoint",
                metric=f"{arch} {metric} bytes / adapter bytes",
                value=size / params,
                unit="x",
                target=(1.01 + 64 * KIB / params) if target else None,
                detail=f"{size:,d} B for {params:,d} B of adapter parameters; {detail}".rstrip("; "),
            )
        )

    add("save_pretrained adapter_model.safetensors (ours)", r["ours"]["safetensors"], r["ours"]["params"], True)
    add("save_pretrained folder (ours)", r["ours"]["folder"], r["ours"]["params"], True, "with adapter_config.json")
    if "peft" in r:
        add("save_pretrained adapter_model.safetensors (peft)", r["peft"]["safetensors"], r["peft"]["params"], False)
    lt = r["lightning"]
    add("Lightning weights-only .ckpt (PEFTCallback)", lt["weights"], lt["params"], True)
    add(
        "Lightning full .ckpt (PEFTCallback)",
        lt["full"],
        lt["params"],
        False,
        "holds AdamW's exp_avg and exp_avg_sq too (resume state)",
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="gpt2")
    args = parser.parse_args()
    for row in rows(args.arch, run(args.arch)):
        print(f"{row['metric']:<75} {row['value']:.4f} {row['unit']}  {row.get('detail', '')}")


if __name__ == "__main__":
    main()
