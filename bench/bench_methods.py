"""IA3 and prompt-learning training step time, ours vs peft, on the GPT-2-style model.

    python bench/bench_methods.py [--quick]

IA3 on c_attn + mlp.c_proj (feed-forward: mlp.c_proj, peft's default for GPT-2); prompt tuning,
P-tuning (MLP encoder) and prefix tuning with 20 virtual tokens. Cases take turns in one process.
"""

from __future__ import annotations

import argparse

from common import MODELS, StepCase, Timings, _quiet, batch, interleave, libraries

VIRTUAL_TOKENS = 20


def configs(lib) -> dict:
    if lib == "ours":
        from lightning_peft import IA3Config, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig
    else:
        from peft import IA3Config, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig
    return {
        "ia3": IA3Config(
            task_type="CAUSAL_LM",
            target_modules=["c_attn", "mlp.c_proj"],
            feedforward_modules=["mlp.c_proj"],
            fan_in_fan_out=True,
        ),
        "prompt": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL_TOKENS),
        "p-tuning": PromptEncoderConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL_TOKENS, encoder_hidden_size=128
        ),
        "prefix": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL_TOKENS),
    }


def build(lib: str, method: str, arch: str = "gpt2"):
    model = MODELS[arch][0](0)
    with _quiet():
        if lib == "ours":
            from lightning_peft import get_peft_model
        else:
            from peft import get_peft_model
        return get_peft_model(model, configs(lib)[method])


def run(methods: list[str], rounds: int, log=print) -> Timings:
    libs = libraries()
    data = batch()
    cases = {f"{m} {lib}": StepCase(build(lib, m), data) for m in methods for lib in libs}
    log(f"[methods] {', '.join(methods)}")
    return interleave(cases, rounds=rounds, steps=1, warmup=1, log=log)


def rows(t: Timings) -> list[dict]:
    out = [
        dict(
            section="methods",
            metric=f"gpt2 {name} step time",
            value=t.median(name),
            unit="s",
            detail=f"spread {t.spread(name):.0%}",
        )
        for name in t.samples
    ]
    for name in t.samples:
        if name.endswith(" ours") and name.replace(" ours", " peft") in t.samples:
            method = name[: -len(" ours")]
            out.append(
                dict(
                    section="methods",
                    metric=f"gpt2 {method} step ours/peft",
                    value=t.ratio(name, f"{method} peft"),
                    unit="x",
                    target=1.0,
                    detail=f"best rounds: {t.best_ratio(name, f'{method} peft'):.3f}",
                )
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--methods", nargs="+", default=["ia3", "prompt", "p-tuning", "prefix"])
    parser.add_argument("--rounds", type=int)
    args = parser.parse_args()
    for row in rows(run(args.methods, args.rounds or (3 if args.quick else 5))):
        print(f"{row['metric']:<60} {row['value']:.3f} {row['unit']}")


if __name__ == "__main__":
    main()
