"""Inference forward: unmerged and merged LoRA vs the base model (ours, and peft beside it).

    python bench/bench_forward.py [--quick] [--arch gpt2 llama] [--rounds N] [--cpu-time]

All models are in eval mode under `torch.inference_mode()`, same weights, same batch. The
adapters get non-zero B so the update is real work (timing does not depend on values anyway).
"""

from __future__ import annotations

import argparse

import torch
from common import ForwardCase, Timings, batch, build_case, interleave, libraries, use_cpu_time


def _nonzero_adapters(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01, generator=torch.Generator().manual_seed(0))
    return model


def forward_cases(arch: str) -> dict[str, ForwardCase]:
    data = batch()
    cases = {"base": ForwardCase(build_case("base", arch), data)}
    for kind in libraries():
        cases[f"{kind} unmerged"] = ForwardCase(_nonzero_adapters(build_case(kind, arch)), data)
        merged = _nonzero_adapters(build_case(kind, arch))
        merged.base_model.merge_adapter()
        cases[f"{kind} merged"] = ForwardCase(merged, data)
    return cases


def run(arch: str, rounds: int, steps: int = 3, log=print) -> Timings:
    log(f"[forward] {arch}")
    return interleave(forward_cases(arch), rounds=rounds, steps=steps, warmup=2, log=log)


def rows(arch: str, t: Timings) -> list[dict]:
    out = [
        dict(
            section="forward",
            metric=f"{arch} forward time, {name}",
            value=t.median(name),
            unit="s",
            detail=f"spread {t.spread(name):.0%}",
        )
        for name in t.samples
    ]
    for kind in ("ours", "peft"):
        if f"{kind} unmerged" not in t.samples:
            continue
        for variant, target in (("unmerged", 1.02), ("merged", 1.01)):
            out.append(
                dict(
                    section="forward",
                    metric=f"{arch} {variant} / base forward ({kind})",
                    value=t.ratio(f"{kind} {variant}", "base"),
                    unit="x",
                    target=target if kind == "ours" else None,
                    detail=f"best rounds: {t.best_ratio(f'{kind} {variant}', 'base'):.3f}",
                )
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--arch", nargs="+", default=["gpt2", "llama"])
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--cpu-time", action="store_true", help="one thread, the main thread's CPU time (busy machine)")
    args = parser.parse_args()
    if args.cpu_time:
        use_cpu_time()
    for arch in args.arch:
        t = run(arch, args.rounds or (5 if args.quick else 11))
        for row in rows(arch, t):
            print(f"{row['metric']:<60} {row['value']:.4f} {row['unit']}")


if __name__ == "__main__":
    main()
