"""Training step time: LoRA (ours, peft) vs full fine-tuning, lora_dropout 0 and 0.05, in one process.

    python bench/bench_step.py [--quick] [--arch gpt2 llama] [--rounds N] [--cpu-time]

Every case (full, ours/peft x dropout 0/0.05) lives in the same process with the same weights
and batch; the cases take turns round by round, and each ratio is the median of per-round ratios.
"""

from __future__ import annotations

import argparse

from common import StepCase, Timings, batch, build_case, interleave, libraries, use_cpu_time

DROPOUTS = (0.0, 0.05)


def step_cases(arch: str) -> dict[str, StepCase]:
    data = batch()
    cases = {"full": StepCase(build_case("full", arch), data)}
    kinds = libraries()
    for dropout in DROPOUTS:
        for kind in kinds:
            cases[f"{kind} p={dropout}"] = StepCase(build_case(kind, arch, dropout), data)
    return cases


def run(arch: str, rounds: int, steps: int = 1, log=print) -> Timings:
    log(f"[step] {arch}")
    return interleave(step_cases(arch), rounds=rounds, steps=steps, warmup=1, log=log)


def rows(arch: str, t: Timings) -> list[dict]:
    out = [
        dict(
            section="step",
            metric=f"{arch} step time, {name}",
            value=t.median(name),
            unit="s",
            detail=f"spread {t.spread(name):.0%}",
        )
        for name in t.samples
    ]
    for dropout in DROPOUTS:
        ours = f"ours p={dropout}"
        target = 0.85 if dropout > 0 else 1.00  # issue 15 (0.90 in issue 7)
        if f"peft p={dropout}" in t.samples:
            out.append(
                dict(
                    section="step",
                    metric=f"{arch} LoRA step ours/peft, dropout {dropout}",
                    value=t.ratio(ours, f"peft p={dropout}"),
                    unit="x",
                    target=target,
                    detail=f"best rounds: {t.best_ratio(ours, f'peft p={dropout}'):.3f}",
                )
            )
        out.append(
            dict(
                section="step",
                metric=f"{arch} LoRA step / full FT step (ours), dropout {dropout}",
                value=t.ratio(ours, "full"),
                unit="x",
                target=0.75 if dropout > 0 else None,
                detail=f"best rounds: {t.best_ratio(ours, 'full'):.3f}",
            )
        )
        if f"peft p={dropout}" in t.samples:
            out.append(
                dict(
                    section="step",
                    metric=f"{arch} LoRA step / full FT step (peft), dropout {dropout}",
                    value=t.ratio(f"peft p={dropout}", "full"),
                    unit="x",
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
    rounds = args.rounds or (3 if args.quick else 7)
    for arch in args.arch:
        t = run(arch, rounds)
        for row in rows(arch, t):
            print(f"{row['metric']:<60} {row['value']:.3f} {row['unit']}")


if __name__ == "__main__":
    main()
