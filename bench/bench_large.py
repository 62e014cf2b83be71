"""Injection and merge_and_unload time on a 1.1B-parameter Llama (TinyLlama-1.1B's shape).

    python bench/bench_large.py [--quick]

- injection on the meta device (no weight memory: what the tuner's own bookkeeping costs), ours and
  peft taking turns;
- injection and `merge_and_unload()` with real bf16 weights on the CPU (2.2 GB; LoRA r=8 on all seven
  projections of the 22 layers, adapters in fp32 as both libraries keep them): ours first, then peft
  on the model ours gave back.
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import time

import torch
from common import _quiet, libraries

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama_1b(device: str = "meta") -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=2048,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    if device != "meta":
        model = model.to_empty(device=device)
        with torch.no_grad():
            for p in model.parameters():  # values do not matter for timing; a constant is quick to write
                p.fill_(0.01)
    return model


def inject(kind: str, model: torch.nn.Module) -> torch.nn.Module:
    with _quiet():
        if kind == "ours":
            from lightning_peft import LoraConfig, get_peft_model
        else:
            from peft import LoraConfig, get_peft_model
        return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=list(TARGETS)))


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def run(rounds: int, log=print) -> dict:
    kinds = libraries()
    meta = llama_1b("meta")
    n_params = sum(p.numel() for p in meta.parameters())
    log(f"[large] Llama {n_params / 1e9:.2f}B parameters")
    meta_times = {k: [] for k in kinds}
    for r in range(rounds):
        for kind in kinds if r % 2 == 0 else kinds[::-1]:
            model = copy.deepcopy(meta)
            _, seconds = timed(inject, kind, model)
            meta_times[kind].append(seconds)
        log("  meta injection: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in meta_times.items()))
    del meta
    results = {"params": n_params, "meta_inject": {k: statistics.median(v) for k, v in meta_times.items()}}
    model = llama_1b("cpu")
    for kind in kinds:
        gc.collect()
        wrapped, inject_s = timed(inject, kind, model)
        model, merge_s = timed(wrapped.merge_and_unload)
        results[f"bf16 {kind}"] = {"inject": inject_s, "merge_and_unload": merge_s}
        log(f"  bf16 {kind}: inject {inject_s:.2f}s, merge_and_unload {merge_s:.2f}s")
        del wrapped
    return results


def rows(r: dict) -> list[dict]:
    size = f"{r['params'] / 1e9:.2f}B"
    out = []
    for kind, seconds in r["meta_inject"].items():
        out.append(
            dict(section="large", metric=f"Llama {size} on meta: injection time ({kind})", value=seconds, unit="s")
        )
    for kind in ("ours", "peft"):
        if f"bf16 {kind}" in r:
            for what, seconds in r[f"bf16 {kind}"].items():
                out.append(
                    dict(
                        section="large",
                        metric=f"Llama {size} bf16 on CPU: {what} time ({kind})",
                        value=seconds,
                        unit="s",
                    )
                )
    if "peft" in r["meta_inject"]:
        out.append(
            dict(
                section="large",
                metric=f"Llama {size} on meta: injection ours / peft",
                value=r["meta_inject"]["ours"] / r["meta_inject"]["peft"],
                unit="x",
                target=1.0,
            )
        )
        for what in ("inject", "merge_and_unload"):
            out.append(
                dict(
                    section="large",
                    metric=f"Llama {size} bf16: {what} ours / peft",
                    value=r["bf16 ours"][what] / r["bf16 peft"][what],
                    unit="x",
                    target=1.0,
                )
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    for row in rows(run(2 if args.quick else 3)):
        print(f"{row['metric']:<60} {row['value']:.3f} {row['unit']}")


if __name__ == "__main__":
    main()
