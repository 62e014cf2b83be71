"""torch.compile: graph breaks of the LoRA models (torch._dynamo.explain), ours and peft.

    python bench/bench_compile.py

Counts breaks over the whole forward (with and without labels; transformers' own loss code may
break the graph on its own, so the plain model is counted too) and the breaks whose stack passes
through lightning_peft's files.
"""

from __future__ import annotations

import argparse

import torch
from common import _quiet, batch, build_case, have_peft


def explain(kind: str, arch: str, labels: bool) -> tuple[int, int, int]:
    torch._dynamo.reset()
    model = build_case(kind, arch, dropout=0.05).train()
    data = batch()
    kwargs = {"input_ids": data["input_ids"][:2, :32]}
    if labels:
        kwargs["labels"] = kwargs["input_ids"]
    with _quiet():
        out = torch._dynamo.explain(model)(**kwargs)
    ours = sum(1 for r in out.break_reasons if any("lightning_peft" in str(f.filename) for f in r.user_stack))
    return out.graph_count, out.graph_break_count, ours


def run(archs: list[str], log=print) -> dict:
    results = {}
    for arch in archs:
        for kind in ["base", "ours"] + (["peft"] if have_peft() else []):
            for labels in (False, True):
                name = f"{arch} {kind}" + (" with labels" if labels else "")
                results[name] = explain(kind, arch, labels)
                log(
                    f"[compile] {name}: graphs {results[name][0]}, breaks {results[name][1]}, "
                    f"in lightning_peft {results[name][2]}"
                )
    return results


def rows(results: dict) -> list[dict]:
    out = []
    for name, (graphs, breaks, ours) in results.items():
        is_ours = " ours" in name
        out.append(
            dict(
                section="compile",
                metric=f"{name}: graph breaks (dynamo.explain)",
                value=breaks,
                unit="",
                detail=f"{graphs} graph(s); breaks in lightning_peft code: {ours}",
            )
        )
        if is_ours:
            out.append(
                dict(section="compile", metric=f"{name}: graph breaks in our layers", value=ours, unit="", target=0)
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", nargs="+", default=["gpt2", "llama"])
    args = parser.parse_args()
    for row in rows(run(args.arch)):
        print(f"{row['metric']:<60} {row['value']} {row.get('detail', '')}")


if __name__ == "__main__":
    main()
