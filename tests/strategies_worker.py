"""Driven by tests/test_strategies.py: train a tiny GPT-2 with adapters on 2 CPU processes.

    python tests/strategies_worker.py --strategy ddp|fsdp|ddp,fsdp --out DIR [--tuners lora,ia3,prompt_tuning]

Lightning's launcher re-runs this script for rank 1, so everything below runs on both ranks. For each
tuner it runs three fits: `full` (4 steps), `part` (2 steps, checkpoint) and `resume` (from `part`'s
last.ckpt up to step 4). Each rank writes, under DIR/<tuner>/<phase>/:
  rank<r>.pt   - the adapter tensors as gathered on that rank, logits of the trained model on a fixed
                 input, parameter counts (our count with DTensors at global size, and the callback's)
and PEFTCallback exports adapter/ (and merged/) there on rank 0. Then one more fit, `two` (DIR/two/): a module with
two models (`model`: LoRA, export='best' from a ModelCheckpoint(monitor='order', mode='min') whose best checkpoint
is the first epoch's; `aux`: IA3, export='last'), two PEFTCallbacks exporting to DIR/two/model and DIR/two/aux, and
rank<r>.pt with both adapters in memory at the end of training and the best checkpoint's path.
With several strategies (`ddp,fsdp`: one pair of
processes runs them one after the other, started and importing once) DIR/<strategy>/ takes the place of DIR/.
`--num-nodes 2`: 2 nodes x 1 process instead of 1 node x 2 processes; the caller starts both processes
(tests/test_multinode.py), Lightning's launcher starts none.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

STEPS = 4
SAMPLES = 4  # batch 2 on 2 ranks: one step per epoch, each rank always sees its own batch


def build_model(seed: int = 0) -> torch.nn.Module:
    from helpers import tiny_gpt2

    return tiny_gpt2(seed, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # no dropout: ranks must agree


def tuner_config(name: str):
    from lightning_peft import IA3Config, LoraConfig, PromptTuningConfig

    if name == "lora":  # modules_to_save: a trainable copy beside a frozen, unused original
        return LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["c_attn", "c_fc"],
            modules_to_save=["ln_f"],
            fan_in_fan_out=True,
            task_type="CAUSAL_LM",
        )
    if name == "ia3":
        return IA3Config(target_modules=["c_attn", "c_fc"], feedforward_modules=["c_fc"], task_type="CAUSAL_LM")
    if name == "prompt_tuning":
        return PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM")
    raise ValueError(name)


def probe_ids() -> torch.Tensor:
    return torch.randint(1, 64, (2, 10), generator=torch.Generator().manual_seed(7))


def run(strategy_name: str, tuner: str, phase: str, out: Path, num_nodes: int = 1) -> None:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_peft.lightning import PEFTCallback
    from lightning_peft.lightning._state import get_state
    from lightning_peft.lightning.strategies import full_tensors, make_strategy, parameter_counts
    from lightning_peft.serialization import get_peft_model_state_dict

    phase_dir = out / tuner / phase

    class LitLM(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = build_model()

        def training_step(self, batch, batch_idx):
            ids = batch[0]
            return self.model(input_ids=ids, labels=ids).loss

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)

    class Probe(pl.Callback):
        """Before PEFTCallback's export / merge (on_fit_end): what each rank holds."""

        def on_train_end(self, trainer, pl_module):
            state = get_state(pl_module)
            counts = parameter_counts(pl_module)
            pl_module.eval()
            with torch.no_grad():
                logits = pl_module.model(input_ids=probe_ids()).logits.float().cpu()
            with full_tensors(pl_module):
                adapter = {
                    k: v.detach().cpu().clone()
                    for k, v in get_peft_model_state_dict(state.peft, adapter_name=state.adapter_name).items()
                }
            torch.save(
                {
                    "adapter": adapter,
                    "logits": logits,
                    "counts": counts,
                    "callback_counts": tuple(state.trainable_counts),
                    "world_size": trainer.world_size,
                    "global_step": trainer.global_step,
                },
                phase_dir / f"rank{trainer.global_rank}.pt",
            )

    class Reseed(pl.Callback):
        """Before PEFTCallback's setup injects the adapter: the same LoRA init however many processes run (what
        Lightning draws from the RNG before setup differs between one process and several)."""

        def setup(self, trainer, pl_module, stage):
            torch.manual_seed(1)

    pl.seed_everything(0, verbose=False)
    module = LitLM()
    ids = torch.randint(1, 64, (SAMPLES, 12), generator=torch.Generator().manual_seed(3))
    # one batch per rank and epoch: a resume (Lightning restarts the unfinished epoch of a plain DataLoader)
    # feeds the same batches as the uninterrupted run, so both must end with the same adapter
    # single: one process sees, in one batch, the samples the two ranks see together (the reference of 2 x 1)
    loader = DataLoader(TensorDataset(ids), batch_size=SAMPLES if strategy_name == "single" else 2, shuffle=False)
    checkpoint = ModelCheckpoint(dirpath=phase_dir / "ckpt", save_last=True, save_top_k=0)
    trainer = pl.Trainer(
        strategy=make_strategy(
            strategy_name, accelerator="cpu", **({} if strategy_name == "single" else {"process_group_backend": "gloo"})
        ),
        accelerator="cpu",
        devices=1 if strategy_name == "single" or num_nodes > 1 else 2,
        num_nodes=num_nodes,
        max_steps=2 if phase == "part" else STEPS,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[
            *([Reseed()] if num_nodes > 1 or strategy_name == "single" else []),
            PEFTCallback(tuner_config(tuner), export_dir=str(phase_dir)),
            Probe(),
            checkpoint,
        ],
    )
    phase_dir.mkdir(parents=True, exist_ok=True)
    ckpt = out / tuner / "part" / "ckpt" / "last.ckpt" if phase == "resume" else None
    trainer.fit(module, loader, ckpt_path=ckpt)


TWO = {"model": ("lora", 0), "aux": ("ia3", 1)}  # model_attr: (tuner, seed of its tiny GPT-2)


def run_two(strategy_name: str, out: Path) -> None:
    """Two models, two PEFTCallbacks; `model` exports the best checkpoint's adapter, `aux` the last one."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_peft.lightning import PEFTCallback
    from lightning_peft.lightning._state import get_state
    from lightning_peft.lightning.strategies import full_tensors, make_strategy
    from lightning_peft.serialization import get_peft_model_state_dict

    phase_dir = out / "two"

    class LitTwo(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = build_model(TWO["model"][1])
            self.aux = build_model(TWO["aux"][1])

        def training_step(self, batch, batch_idx):
            ids = batch[0]
            # the same value on every rank; mode="min": the first epoch's checkpoint stays the best
            self.log("order", float(self.global_step))
            return self.model(input_ids=ids, labels=ids).loss + self.aux(input_ids=ids, labels=ids).loss

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)

    checkpoint = ModelCheckpoint(dirpath=phase_dir / "ckpt", monitor="order", mode="min", save_top_k=1)

    class Probe(pl.Callback):
        def on_train_end(self, trainer, pl_module):
            states = {attr: get_state(pl_module, attr) for attr in TWO}
            with full_tensors(pl_module):
                adapters = {
                    attr: {
                        k: v.detach().cpu().clone()
                        for k, v in get_peft_model_state_dict(state.peft, adapter_name=state.adapter_name).items()
                    }
                    for attr, state in states.items()
                }
            torch.save(
                {"adapters": adapters, "best": checkpoint.best_model_path, "global_step": trainer.global_step},
                phase_dir / f"rank{trainer.global_rank}.pt",
            )

    pl.seed_everything(0, verbose=False)
    module = LitTwo()
    ids = torch.randint(1, 64, (SAMPLES, 12), generator=torch.Generator().manual_seed(3))
    loader = DataLoader(TensorDataset(ids), batch_size=2, shuffle=False)
    callbacks = [
        PEFTCallback(tuner_config(tuner), model_attr=attr, export_dir=str(phase_dir / attr), export=export)
        for (attr, (tuner, _)), export in zip(TWO.items(), ("best", "last"))
    ]
    trainer = pl.Trainer(
        strategy=make_strategy(strategy_name, accelerator="cpu", process_group_backend="gloo"),
        accelerator="cpu",
        devices=2,
        max_steps=STEPS,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[*callbacks, Probe(), checkpoint],
    )
    phase_dir.mkdir(parents=True, exist_ok=True)
    trainer.fit(module, loader)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tuners", default="lora,ia3,prompt_tuning")
    parser.add_argument("--phases", default="full,part,resume")
    parser.add_argument("--no-two", dest="two", action="store_false", help="skip the two-model fit")
    # 2: this process is one of two "nodes" of 1 process each, started by the caller with NODE_RANK, MASTER_ADDR,
    # MASTER_PORT and WORLD_SIZE set (tests/test_multinode.py), as the same command on each node of a cluster
    parser.add_argument("--num-nodes", type=int, default=1)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    strategies = args.strategy.split(",")
    for strategy in strategies:
        out = Path(args.out) / strategy if len(strategies) > 1 else Path(args.out)
        for tuner in filter(None, args.tuners.split(",")):  # --tuners "": the two-model fit only
            for phase in args.phases.split(","):
                run(strategy, tuner, phase, out, num_nodes=args.num_nodes)
        if args.two:
            run_two(strategy, out)


if __name__ == "__main__":
    main()
