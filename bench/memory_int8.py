"""Resident memory of an 8-bit base (bitsandbytes Linear8bitLt) vs the fp32 base, with LoRA on top.

    python bench/memory_int8.py [--width 1024 --layers 8 --vocab 8192] [--out bench/RESULTS_int8.md]

Each case runs in its own process (so one case's freed memory cannot hide in another's numbers):
build a Llama-style model from a config (no download), optionally quantize its base linears, inject
LoRA (r=8 on every projection), run one training step. Reported: parameter + buffer bytes of the
model, resident set size (RSS) above the process's baseline after imports, once the model is built
and after a forward/backward step. `MALLOC_MMAP_THRESHOLD_` is set so that freed fp32 weights go
back to the OS and RSS shows what the process really keeps.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def case(quantize: bool, width: int, layers: int, vocab: int) -> dict:
    import gc

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, ROOT)
    from lightning_peft import LoraConfig, get_peft_model
    from lightning_peft import quantization as q

    torch.set_num_threads(2)
    gc.collect()
    baseline = rss_mb()
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=width,
        intermediate_size=int(width * 2.75),
        num_hidden_layers=layers,
        num_attention_heads=width // 64,
        num_key_value_heads=width // 64,
        vocab_size=vocab,
        max_position_embeddings=256,
    )
    model = LlamaForCausalLM(config)
    if quantize:
        q.quantize_base_linears(model)
    peft = get_peft_model(
        model,
        LoraConfig(
            r=8,
            lora_alpha=16,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ),
    )
    gc.collect()
    model_bytes = sum(t.numel() * t.element_size() for t in list(peft.parameters()) + list(peft.buffers()))
    scb = sum(m.weight.SCB.numel() * 4 for m in peft.modules() if q.is_linear8bit(m) and m.weight.SCB is not None)
    built = rss_mb() - baseline
    ids = torch.randint(0, vocab, (2, 64))
    start = time.perf_counter()
    peft.train()
    loss = peft(input_ids=ids, labels=ids).loss
    loss.backward()
    step_s = time.perf_counter() - start
    gc.collect()
    return {
        "case": "int8 base" if quantize else "fp32 base",
        "model_mb": round((model_bytes + scb) / 2**20, 1),
        "rss_built_mb": round(built, 1),
        "rss_after_step_mb": round(rss_mb() - baseline, 1),
        "step_s": round(step_s, 2),
        "int8_layers": len(q.int8_layers(peft)),
        "trainable": sum(p.numel() for p in peft.parameters() if p.requires_grad),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--case", choices=["fp32", "int8"])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.case:  # child process: one case, JSON on the last line
        print(json.dumps(case(args.case == "int8", args.width, args.layers, args.vocab)))
        return
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    rows = []
    for name in ("fp32", "int8"):
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--case",
                name,
                "--width",
                str(args.width),
                "--layers",
                str(args.layers),
                "--vocab",
                str(args.vocab),
            ],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    header = (
        f"Llama-style model, width {args.width}, {args.layers} layers, vocab {args.vocab}; LoRA r=8 on all "
        "projections; one CPU training step on a (2, 64) batch"
    )
    lines = [
        header,
        "",
        "| base | model MB | RSS built MB | RSS after step MB | step s | 8-bit layers | trainable |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['model_mb']} | {r['rss_built_mb']} | {r['rss_after_step_mb']} | "
            f"{r['step_s']} | {r['int8_layers']} | {r['trainable']:,d} |"
        )
    fp32, int8 = rows
    lines += [
        "",
        f"int8 / fp32: model bytes {int8['model_mb'] / fp32['model_mb']:.2f}x, resident after build "
        f"{int8['rss_built_mb'] / fp32['rss_built_mb']:.2f}x",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write("# 8-bit base vs fp32 base: memory\n\n`python bench/memory_int8.py`\n\n" + text + "\n")


if __name__ == "__main__":
    main()
