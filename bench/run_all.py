"""Run every benchmark, print one table and write bench/RESULTS.md (+ bench/results.json).

    python bench/run_all.py            # the full run
    python bench/run_all.py --quick    # fewer rounds (a few minutes on an idle 2-core CPU)
    python bench/run_all.py --only step forward

Sections: step (LoRA vs peft vs full FT), forward (unmerged / merged vs base), trainer (Trainer +
PEFTCallback vs a bare loop), memory (peak RSS, one process per case), checkpoint (bytes vs adapter
bytes), large (injection / merge_and_unload on a 1.1B Llama), compile (graph breaks), methods (IA3 and
prompt learning vs peft), multi (2 active adapters and mixed-adapter batches vs peft).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import common  # noqa: E402

SECTIONS = ["step", "forward", "trainer", "memory", "checkpoint", "large", "compile", "methods", "multi"]


def collect(section: str, quick: bool, log) -> list[dict]:
    if section == "step":
        import bench_step

        return [
            row
            for arch in ("gpt2", "llama")
            for row in bench_step.rows(arch, bench_step.run(arch, 3 if quick else 7, log=log))
        ]
    if section == "forward":
        import bench_forward

        return [
            row
            for arch in ("gpt2", "llama")
            for row in bench_forward.rows(arch, bench_forward.run(arch, 5 if quick else 11, log=log))
        ]
    if section == "trainer":
        import bench_trainer

        return bench_trainer.rows("gpt2", bench_trainer.run("gpt2", 5 if quick else 11, log=log))
    if section == "memory":
        import bench_memory

        return bench_memory.rows(bench_memory.run(["gpt2"] if quick else ["gpt2", "llama"], log=log))
    if section == "checkpoint":
        import bench_checkpoint

        return bench_checkpoint.rows("gpt2", bench_checkpoint.run("gpt2", log=log))
    if section == "large":
        import bench_large

        return bench_large.rows(bench_large.run(2 if quick else 3, log=log))
    if section == "compile":
        import bench_compile

        return bench_compile.rows(bench_compile.run(["gpt2", "llama"], log=log))
    if section == "methods":
        import bench_methods

        return bench_methods.rows(
            bench_methods.run(["ia3", "prompt", "p-tuning", "prefix"], 3 if quick else 5, log=log)
        )
    if section == "multi":
        import bench_multi_adapter

        return [
            row
            for arch in ("llama", "gpt2")
            for row in bench_multi_adapter.rows(arch, bench_multi_adapter.run(arch, 5 if quick else 11, log=log))
        ]
    raise ValueError(section)


def verdict(row: dict) -> str:
    target = row.get("target")
    if target is None:
        return ""
    return "met" if row["value"] <= target + 1e-12 else "MISSED"


def fmt(row: dict) -> str:
    value, unit = row["value"], row["unit"]
    if unit == "s":
        return f"{value * 1e3:.0f} ms" if value < 10 else f"{value:.2f} s"
    if unit == "x":
        return f"{value:.3f}"
    if unit == "MiB":
        return f"{value:.0f} MiB"
    return f"{value}"


def fmt_target(row: dict) -> str:
    target = row.get("target")
    if target is None:
        return ""
    return f"<= {target:.3f}" if isinstance(target, float) else f"<= {target}"


def table(rows: list[dict]) -> str:
    lines = ["| section | measure | value | target | | notes |", "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['section']} | {row['metric']} | {fmt(row)} | {fmt_target(row)} | {verdict(row)} | "
            f"{row.get('detail', '')} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="+", choices=SECTIONS)
    parser.add_argument("--out", default=os.path.join(HERE, "results.json"))
    args = parser.parse_args()
    started = time.time()
    rows: list[dict] = []
    for section in args.only or SECTIONS:
        t0 = time.time()
        rows += collect(section, args.quick, log=lambda msg: print(msg, flush=True))
        print(f"[{section}] done in {time.time() - t0:.0f}s", flush=True)
        with open(args.out, "w") as f:  # after every section: a later failure keeps what was measured
            json.dump({"meta": {"partial": True}, "rows": rows}, f, indent=1)
    command = (
        "python bench/run_all.py"
        + (" --quick" if args.quick else "")
        + (f" --only {' '.join(args.only)}" if args.only else "")
    )
    meta = {
        "command": command,
        "machine": common.machine(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "seconds": round(time.time() - started),
        "load_average": os.getloadavg(),
    }
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print()
    print(table(rows))
    print(
        f"\n{meta['command']} on {meta['machine']}; {meta['seconds']}s; load average at the end {meta['load_average']}"
    )


if __name__ == "__main__":
    main()
