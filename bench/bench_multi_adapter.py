"""Several LoRA adapters at inference, ours vs HF peft: (a) a forward with 2 active adapters (their outputs add up),
(b) a mixed-adapter batch (`adapter_names=`: each sample through its own adapter, 2 adapters + "__base__").

    python bench/bench_multi_adapter.py [--quick] [--arch llama gpt2]

Models: Llama-style and GPT-2-style, 4 layers x 256 wide (4 heads, vocab 2048), built from configs with the same
seed; two LoRA adapters (r=8, alpha=16, non-zero weights) on every linear layer of the blocks; batch 8 x 128 tokens,
fp32, eval mode under `torch.inference_mode()`. Cases take turns round by round (common.interleave); ratios are
medians of per-round ratios.
"""

from __future__ import annotations

import argparse
import time
import zlib
from typing import Any

import torch
from common import GPT2_TARGETS, LLAMA_TARGETS, MODELS, Timings, _quiet, have_peft, interleave
from torch import nn

BATCH, SEQ = 8, 128
WIDTH, LAYERS, HEADS = 256, 4, 4
VOCAB = 2048  # a small LM head, so the adapters' share of the forward is not hidden behind it
NAMES = ["default", "b", "__base__", "default", "b", "__base__", "b", "default"]  # one per sample


def build(arch: str, seed: int = 0) -> nn.Module:
    builder = MODELS[arch][0]
    return builder(seed=seed, vocab=VOCAB, layers=LAYERS, width=WIDTH, heads=HEADS).eval()


def two_adapters(lib: Any, arch: str) -> nn.Module:
    """`lib` (lightning_peft or peft) with adapters "default" and "b" on the same base weights and the same
    adapter weights (seeded by parameter name)."""
    targets = LLAMA_TARGETS if arch == "llama" else GPT2_TARGETS
    kwargs = dict(r=8, lora_alpha=16, target_modules=list(targets), fan_in_fan_out=arch == "gpt2")
    with _quiet():
        model = lib.get_peft_model(build(arch), lib.LoraConfig(task_type="CAUSAL_LM", **kwargs))
        model.add_adapter("b", lib.LoraConfig(task_type="CAUSAL_LM", **kwargs))
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if ".lora_" in name:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(zlib.crc32(name.encode())))
    return model.eval()


def activate_both(model: nn.Module) -> None:
    """Both adapters active: `base_model.set_adapter([...])` (HF PEFT's API), else layer by layer."""
    try:
        model.base_model.set_adapter(["default", "b"])
        return
    except (TypeError, ValueError):
        pass
    for module in model.modules():
        if hasattr(module, "lora_A") and hasattr(module, "set_adapter"):
            module.set_adapter(["default", "b"])


class Case:
    def __init__(self, model: nn.Module, ids: torch.Tensor, **kwargs: Any) -> None:
        self.model, self.ids, self.kwargs = model, ids, kwargs

    @torch.inference_mode()
    def run(self, n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            self.model(input_ids=self.ids, **self.kwargs)
        return (time.perf_counter() - start) / n


def cases(arch: str) -> dict[str, Case]:
    import lightning_peft

    ids = torch.randint(1, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    libs = {"ours": lightning_peft}
    if have_peft():
        import peft

        libs["peft"] = peft
    out = {}
    models = {}
    for kind, lib in libs.items():
        one = two_adapters(lib, arch)  # "default" active
        out[f"{kind} 1 active"] = Case(one, ids)
        both = two_adapters(lib, arch)
        activate_both(both)
        out[f"{kind} 2 active"] = Case(both, ids)
        out[f"{kind} mixed"] = Case(one, ids, adapter_names=NAMES)
        models[kind] = (one, both)
    if "peft" in models:  # same numbers before timing them
        with torch.inference_mode():
            for i, what in ((1, "2 active"), (0, "mixed")):
                kwargs = {} if i else {"adapter_names": NAMES}
                ours = models["ours"][i](input_ids=ids, **kwargs).logits
                theirs = models["peft"][i](input_ids=ids, **kwargs).logits
                torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4, msg=f"{arch} {what}: ours != peft")
    return out


def run(arch: str, rounds: int, steps: int = 3, log=print) -> Timings:
    log(f"[multi] {arch}")
    return interleave(cases(arch), rounds=rounds, steps=steps, warmup=2, log=log)


def rows(arch: str, t: Timings) -> list[dict]:
    out = [
        dict(
            section="multi",
            metric=f"{arch} forward, {name}",
            value=t.median(name),
            unit="s",
            detail=f"spread {t.spread(name):.0%}",
        )
        for name in t.samples
    ]
    if "peft mixed" in t.samples:
        for what in ("1 active", "2 active", "mixed"):
            out.append(
                dict(
                    section="multi",
                    metric=f"{arch} {what} forward ours / peft",
                    value=t.ratio(f"ours {what}", f"peft {what}"),
                    unit="x",
                    target=1.0 if what != "1 active" else None,
                    detail=f"best rounds: {t.best_ratio(f'ours {what}', f'peft {what}'):.3f}",
                )
            )
    return out


def table(all_rows: list[dict]) -> str:
    """One side-by-side table: per model and case, ours / peft times and their ratio."""
    times = {r["metric"]: r["value"] for r in all_rows if r["unit"] == "s"}
    ratios = {r["metric"]: r for r in all_rows if r["unit"] == "x"}
    lines = [
        "| model | case | ours | peft | ours / peft (median of rounds) | best rounds |",
        "|---|---|---|---|---|---|",
    ]
    for arch in dict.fromkeys(r["metric"].split()[0] for r in all_rows):
        for what in ("1 active", "2 active", "mixed"):
            ours = times.get(f"{arch} forward, ours {what}")
            theirs = times.get(f"{arch} forward, peft {what}")
            ratio = ratios.get(f"{arch} {what} forward ours / peft")
            label = {
                "1 active": "1 adapter active (reference)",
                "2 active": "2 adapters active",
                "mixed": "mixed batch: adapter_names, 2 adapters + __base__",
            }[what]
            lines.append(
                f"| {arch} 4x{WIDTH} | {label} | {ours * 1e3:.1f} ms | "
                + (
                    f"{theirs * 1e3:.1f} ms | {ratio['value']:.3f} | {ratio['detail'].split(': ')[1]} |"
                    if theirs is not None and ratio is not None
                    else "- | - | - |"
                )
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--arch", nargs="+", default=["llama", "gpt2"])
    parser.add_argument("--rounds", type=int)
    args = parser.parse_args()
    all_rows = []
    for arch in args.arch:
        all_rows += rows(arch, run(arch, args.rounds or (5 if args.quick else 11)))
    print()
    print(table(all_rows))


if __name__ == "__main__":
    main()
