"""Shared pieces of the benchmarks: models built from configs, data, timing, peft detection.

Every bench builds the same models from the same seed, so ours / peft / full fine-tuning see the
same weights and the same batch. Times are medians over interleaved rounds: in each round every
case runs its steps once, so all cases share whatever else the machine is doing at that moment,
and ratios are taken per round (paired) before the median.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch import nn  # noqa: E402

BATCH, SEQ = 8, 128
WIDTH, LAYERS, HEADS = 512, 6, 8
VOCAB = 8192
RANK, ALPHA = 8, 16

GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def have_peft() -> bool:
    return importlib.util.find_spec("peft") is not None


def libraries() -> list[str]:
    """The adapter libraries to compare: ours, and HF peft when it is installed."""
    return ["ours", "peft"] if have_peft() else ["ours"]


# ---------------------------------------------------------------------------------------------
# models and data
# ---------------------------------------------------------------------------------------------
def build_gpt2(
    seed: int = 0, vocab: int = VOCAB, layers: int = LAYERS, width: int = WIDTH, heads: int = HEADS
) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=layers,
        n_embd=width,
        n_head=heads,
        n_positions=2 * SEQ,
        vocab_size=vocab,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return GPT2LMHeadModel(config)


def build_llama(
    seed: int = 0, vocab: int = VOCAB, layers: int = LAYERS, width: int = WIDTH, heads: int = HEADS
) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        num_hidden_layers=layers,
        hidden_size=width,
        intermediate_size=width * 43 // 16,  # 1376 at 512 wide: Llama's ~2.7x MLP
        num_attention_heads=heads,
        num_key_value_heads=heads,
        vocab_size=vocab,
        max_position_embeddings=2 * SEQ,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config)


MODELS: dict[str, tuple[Callable[..., nn.Module], list[str]]] = {
    "gpt2": (build_gpt2, GPT2_TARGETS),
    "llama": (build_llama, LLAMA_TARGETS),
}


def batch(vocab: int = VOCAB, seed: int = 1) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids.clone()}


def lora_kwargs(arch: str, dropout: float) -> dict[str, Any]:
    return dict(
        r=RANK,
        lora_alpha=ALPHA,
        lora_dropout=dropout,
        target_modules=list(MODELS[arch][1]),
        fan_in_fan_out=arch == "gpt2",
    )


def wrap_ours(model: nn.Module, arch: str, dropout: float) -> nn.Module:
    from lightning_peft import LoraConfig, get_peft_model

    with _quiet():
        return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora_kwargs(arch, dropout)))


def wrap_peft(model: nn.Module, arch: str, dropout: float) -> nn.Module:
    import peft

    with _quiet():
        return peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", **lora_kwargs(arch, dropout)))


def build_case(kind: str, arch: str, dropout: float = 0.0, seed: int = 0) -> nn.Module:
    """`kind`: base | full | ours | peft. Same weights for every kind (same seed)."""
    model = MODELS[arch][0](seed)
    if kind == "ours":
        model = wrap_ours(model, arch, dropout)
    elif kind == "peft":
        model = wrap_peft(model, arch, dropout)
    elif kind == "base":
        model.requires_grad_(False)
    elif kind != "full":
        raise ValueError(kind)
    return model


class _quiet:
    def __enter__(self) -> None:
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc: Any) -> None:
        self._ctx.__exit__(*exc)


# ---------------------------------------------------------------------------------------------
# a training step
# ---------------------------------------------------------------------------------------------
def cpu_trainer(root: str, **kwargs: Any) -> Any:
    """A Lightning Trainer on one CPU with no logger, checkpointing, progress bar or model summary, writing under
    `root`; `kwargs` add to or override these (e.g. `enable_checkpointing=True` with a ModelCheckpoint)."""
    import lightning.pytorch as pl

    options: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    return pl.Trainer(**{**options, **kwargs})


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=1e-4)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, data: dict[str, torch.Tensor]) -> float:
    loss = model(**data).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


# the clock the cases read: wall time by default; `use_cpu_time()` switches to the main thread's CPU time
CLOCK: Callable[[], float] = time.perf_counter


def use_cpu_time() -> None:
    """Time with the main thread's CPU time, on one intra-op thread (on CPU the backward pass runs in the
    calling thread too, so a step's whole work is counted): on a machine other jobs share, time spent
    descheduled is not counted, only cache and memory-bandwidth contention remains."""
    global CLOCK
    torch.set_num_threads(1)
    CLOCK = time.thread_time


class StepCase:
    """A model in train mode with its optimizer; `run(n)` times n training steps."""

    def __init__(self, model: nn.Module, data: dict[str, torch.Tensor]) -> None:
        self.model = model.train()
        self.optimizer = make_optimizer(model)
        self.data = data

    def run(self, n: int) -> float:
        start = CLOCK()
        for _ in range(n):
            train_step(self.model, self.optimizer, self.data)
        return (CLOCK() - start) / n


class ForwardCase:
    def __init__(self, model: nn.Module, data: dict[str, torch.Tensor]) -> None:
        self.model = model.eval()
        self.ids = data["input_ids"]

    @torch.inference_mode()
    def run(self, n: int) -> float:
        start = CLOCK()
        for _ in range(n):
            self.model(input_ids=self.ids)
        return (CLOCK() - start) / n


# ---------------------------------------------------------------------------------------------
# interleaved timing
# ---------------------------------------------------------------------------------------------
@dataclass
class Timings:
    samples: dict[str, list[float]] = field(default_factory=dict)

    def median(self, name: str) -> float:
        return statistics.median(self.samples[name])

    def ratio(self, num: str, den: str) -> float:
        """Median of the per-round ratios (rounds pair cases measured back to back)."""
        return statistics.median(a / b for a, b in zip(self.samples[num], self.samples[den]))

    def best_ratio(self, num: str, den: str) -> float:
        """Ratio of the fastest rounds: on a shared machine other load only ever adds time, so the
        minimum is the steadier estimate of a case's own cost when the machine is busy."""
        return min(self.samples[num]) / min(self.samples[den])

    def spread(self, name: str) -> float:
        xs = self.samples[name]
        return (max(xs) - min(xs)) / statistics.median(xs) if len(xs) > 1 else 0.0


def interleave(
    cases: dict[str, Any], rounds: int, steps: int, warmup: int = 2, log: Optional[Callable[[str], None]] = None
) -> Timings:
    """Time every case `rounds` times, `steps` steps each, cycling through the cases every round
    (the order rotates so no case always runs right after the same neighbour)."""
    for case in cases.values():
        case.run(warmup)
    timings = Timings({name: [] for name in cases})
    names = list(cases)
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            gc.collect()
            timings.samples[name].append(cases[name].run(steps))
        if log:
            log(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {timings.samples[n][-1] * 1e3:.0f}ms" for n in names))
    return timings


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import lightning
    import transformers

    peft_version = "absent"
    if have_peft():
        import peft

        peft_version = peft.__version__
    return (
        f"{cpu}, {os.cpu_count()} CPU cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"transformers {transformers.__version__}, lightning {lightning.__version__}, peft {peft_version}, "
        f"Python {platform.python_version()}"
    )
