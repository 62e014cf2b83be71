"""QLoRA on CPU: memory of a training step over an fp32 / 8-bit / 4-bit base, and the QLoRA step ours vs HF PEFT.

    python bench/bench_qlora.py [--rounds 5 --steps 2] [--skip-memory] [--skip-speed]

Memory: each base runs in its own process (freed memory of one case cannot hide in another's numbers): Llama 6x512
(bench/common.py's build_llama), base linears quantized or not (`quantize_base_linears`, bits=8 / bits=4 NF4 with
double quantization, fp32 compute), LoRA r=8 on every projection, one AdamW training step on an 8x128 batch.
Measured: the model's parameter + buffer bytes (4-bit: with its quantization statistics, 8-bit: with SCB), and the
process's peak resident set size (`ru_maxrss`) above its size after imports, i.e. the peak of building the model
and one step. `MALLOC_MMAP_THRESHOLD_` is set so freed fp32 weights go back to the OS.

Speed: the same 4-bit model (same seed, same bytes) under our LoRA and HF PEFT's (`peft.tuners.lora.bnb.Linear4bit`),
lora_dropout=0.05, training steps timed in interleaved rounds (bench/common.py `interleave`); the ratio is the median
of the per-round ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def quantized_model(bits: int):
    import common

    from lightning_peft import quantization as q

    model = common.build_llama(0)
    if bits:
        q.quantize_base_linears(model, bits=bits)
    return model


def memory_case(bits: int) -> dict:
    import gc

    import common
    import torch

    from lightning_peft import quantization as q

    torch.set_num_threads(2)
    gc.collect()
    baseline = rss_mb()
    baseline_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peft = common.wrap_ours(quantized_model(bits), "llama", 0.0)
    gc.collect()
    tensors = list(peft.parameters()) + list(peft.buffers())
    model_bytes = sum(t.numel() * t.element_size() for t in tensors)
    for m in peft.modules():
        if q.is_linear8bit(m) and getattr(m.weight, "SCB", None) is not None:
            model_bytes += m.weight.SCB.numel() * 4
        if q.is_linear4bit(m):
            state = m.weight.quant_state
            model_bytes += sum(v.numel() * v.element_size() for v in state.as_dict(packed=True).values())
    built = rss_mb() - baseline
    case = common.StepCase(peft, common.batch())
    step_s = case.run(1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "base": {0: "fp32", 8: "int8", 4: "int4 (NF4, double quant)"}[bits],
        "model_mb": round(model_bytes / 2**20, 1),
        "rss_built_mb": round(built, 1),
        # the imports' own peak (baseline_peak) is below the build + step peak in every case measured
        "peak_rss_mb": round(peak - baseline, 1) if peak > baseline_peak else None,
        "step_s": round(step_s, 2),
        "quantized_layers": len(q.quantized_layer_names(peft)),
    }


def speed(rounds: int, steps: int) -> dict:
    import common
    import peft as hf
    import torch

    torch.set_num_threads(2)
    data = common.batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = common.wrap_ours(quantized_model(4), "llama", 0.05)
        hf_base = quantized_model(4)
        hf_base.is_loaded_in_4bit = True  # set by transformers (BitsAndBytesConfig); HF PEFT dispatches on it
        theirs = hf.get_peft_model(hf_base, hf.LoraConfig(task_type="CAUSAL_LM", **common.lora_kwargs("llama", 0.05)))
    assert type(theirs.base_model.model.model.layers[0].self_attn.q_proj).__module__.startswith("peft.tuners.lora.bnb")
    cases = {"ours": common.StepCase(ours, data), "peft": common.StepCase(theirs, data)}
    t = common.interleave(cases, rounds=rounds, steps=steps, warmup=1, log=print)
    return {
        "ours_ms": round(t.median("ours") * 1e3),
        "peft_ms": round(t.median("peft") * 1e3),
        "ratio": round(t.ratio("ours", "peft"), 3),
        "best_ratio": round(t.best_ratio("ours", "peft"), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", type=int, choices=[0, 8, 4])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args()
    if args.case is not None:  # child process: one memory case, JSON on the last line
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            print(json.dumps(memory_case(args.case)))
        return
    if not args.skip_memory:
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
        rows = []
        for bits in (0, 8, 4):
            out = subprocess.run(
                [sys.executable, __file__, "--case", str(bits)], env=env, capture_output=True, text=True, check=True
            )
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print("Llama 6x512, LoRA r=8 on all projections, one AdamW step on an 8x128 batch (CPU)")
        print("| base | model MB | RSS built MB | peak RSS MB (build + step) | step s | quantized layers |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(
                f"| {r['base']} | {r['model_mb']} | {r['rss_built_mb']} | {r['peak_rss_mb']} | {r['step_s']} | "
                f"{r['quantized_layers']} |"
            )
    if not args.skip_speed:
        s = speed(args.rounds, args.steps)
        print(
            f"QLoRA step (4-bit NF4 base, lora_dropout=0.05): ours {s['ours_ms']} ms, HF peft {s['peft_ms']} ms, "
            f"ours / HF median of rounds {s['ratio']}, of best rounds {s['best_ratio']}"
        )


if __name__ == "__main__":
    main()
