"""DoRA training step: ours vs HF peft, side by side in one process (issue 15, item 4: ours / peft <= 0.90).

    python bench/bench_dora.py [--quick] [--arch gpt2 llama] [--rounds N] [--dropout 0.0 0.05]

GPT-2 and Llama 6x512, batch 8x128, r=8, every linear layer targeted (bench/common.py), `use_dora=True`. The same
weights and batch for both libraries; the cases take turns round by round and each ratio is the median of the
per-round ratios (rounds pair cases measured back to back).
"""

from __future__ import annotations

import argparse

from common import MODELS, StepCase, _quiet, batch, interleave, libraries, lora_kwargs, machine


def build(kind: str, arch: str, dropout: float):
    model = MODELS[arch][0](0)
    kwargs = dict(lora_kwargs(arch, dropout), use_dora=True)
    with _quiet():
        if kind == "ours":
            from lightning_peft import LoraConfig, get_peft_model

            return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **kwargs))
        import peft

        return peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", **kwargs))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--arch", nargs="+", default=["gpt2", "llama"])
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--dropout", nargs="+", type=float, default=[0.0, 0.05])
    args = parser.parse_args()
    rounds = args.rounds or (3 if args.quick else 7)
    print(machine())
    table = []
    for arch in args.arch:
        data = batch()
        cases = {}
        for p in args.dropout:
            for kind in libraries():
                cases[f"{kind} p={p}"] = StepCase(build(kind, arch, p), data)
        t = interleave(cases, rounds=rounds, steps=1, warmup=1, log=print)
        for p in args.dropout:
            if f"peft p={p}" in t.samples:
                table.append(
                    (
                        arch,
                        p,
                        t.median(f"ours p={p}"),
                        t.median(f"peft p={p}"),
                        t.ratio(f"ours p={p}", f"peft p={p}"),
                        t.best_ratio(f"ours p={p}", f"peft p={p}"),
                    )
                )
    print(f"\n{'arch':<6} {'dropout':>7} {'ours ms':>8} {'peft ms':>8} {'ours/peft':>9} {'best':>6}  (target <= 0.90)")
    for arch, p, ours, hf, ratio, best in table:
        print(f"{arch:<6} {p:>7} {ours * 1e3:>8.0f} {hf * 1e3:>8.0f} {ratio:>9.3f} {best:>6.3f}")


if __name__ == "__main__":
    main()
