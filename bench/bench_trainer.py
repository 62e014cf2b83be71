"""A Lightning `Trainer` step with `PEFTCallback` vs the same step in a bare torch loop.

    python bench/bench_trainer.py [--quick]

One `Trainer.fit` runs the LoRA model through PEFTCallback (defaults, logging the loss every step).
Between two of its steps a timing callback runs one step of the bare loop (its own copy of the same
model wrapped with `get_peft_model`, its own AdamW, its own DataLoader over the same data), so the
two alternate step by step under the same conditions. A Trainer step is the time from one
`on_train_batch_start` to the next (data fetch, hooks, logging, optimizer included) minus the bare
step run in between; a bare step is its own loop iteration, data fetch included.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from common import BATCH, MODELS, SEQ, VOCAB, _quiet, cpu_trainer, lora_kwargs, make_optimizer, wrap_ours
from torch.utils.data import DataLoader, TensorDataset


def dataset(n_batches: int) -> TensorDataset:
    ids = torch.randint(1, VOCAB, (n_batches * BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    return TensorDataset(ids)


def run(arch: str, rounds: int, dropout: float = 0.05, log=print) -> dict:
    import lightning.pytorch as pl

    from lightning_peft import LoraConfig
    from lightning_peft.lightning import PEFTCallback

    log(f"[trainer] {arch}, lora_dropout {dropout}")
    warmup = 2
    steps = warmup + rounds
    data = dataset(steps + 1)

    class LM(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = MODELS[arch][0](0)

        def training_step(self, batch, batch_idx):
            ids = batch[0]
            loss = self.model(input_ids=ids, labels=ids).loss
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return make_optimizer(self)

    bare_model = wrap_ours(MODELS[arch][0](0), arch, dropout).train()
    bare_opt = make_optimizer(bare_model)
    bare_batches = iter(DataLoader(data, batch_size=BATCH))
    times = {"trainer": [], "bare": []}

    def bare_step() -> float:
        start = time.perf_counter()
        ids = next(bare_batches)[0]
        loss = bare_model(input_ids=ids, labels=ids).loss
        loss.backward()
        bare_opt.step()
        bare_opt.zero_grad(set_to_none=True)
        loss.item()
        return time.perf_counter() - start

    class Alternate(pl.Callback):
        last_start = None
        bare_time = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            now = time.perf_counter()
            if self.last_start is not None and batch_idx > warmup:
                times["trainer"].append(now - self.last_start - self.bare_time)
                times["bare"].append(self.bare_time)
                log(
                    f"  step {batch_idx}: trainer {times['trainer'][-1] * 1e3:.0f}ms, bare {self.bare_time * 1e3:.0f}ms"
                )
            self.last_start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.bare_time = bare_step()

    config = LoraConfig(task_type="CAUSAL_LM", **lora_kwargs(arch, dropout))
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        trainer = cpu_trainer(
            tmp,
            max_steps=steps + 1,
            callbacks=[PEFTCallback(config, merge_on_train_end=False, export_dir=tmp), Alternate()],
        )
        trainer.fit(LM(), DataLoader(data, batch_size=BATCH))
    ratios = [a / b for a, b in zip(times["trainer"], times["bare"])]
    return {
        "trainer": statistics.median(times["trainer"]),
        "bare": statistics.median(times["bare"]),
        "ratio": statistics.median(ratios),
        "n": len(ratios),
    }


def rows(arch: str, result: dict) -> list[dict]:
    return [
        dict(section="trainer", metric=f"{arch} Trainer+PEFTCallback step", value=result["trainer"], unit="s"),
        dict(section="trainer", metric=f"{arch} bare torch loop step", value=result["bare"], unit="s"),
        dict(
            section="trainer",
            metric=f"{arch} Trainer+PEFTCallback / bare loop step",
            value=result["ratio"],
            unit="x",
            target=1.05,
            detail=f"median of {result['n']} paired steps",
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--arch", nargs="+", default=["gpt2"])
    parser.add_argument("--rounds", type=int)
    args = parser.parse_args()
    for arch in args.arch:
        for row in rows(arch, run(arch, args.rounds or (5 if args.quick else 11))):
            print(f"{row['metric']:<60} {row['value']:.3f} {row['unit']}")


if __name__ == "__main__":
    main()
