"""Peak resident memory of a training step, each case in its own process.

    python bench/bench_memory.py [--quick]

A child process builds one case (full fine-tuning, ours or peft at a dropout), resets the kernel's
high-water mark (/proc/self/clear_refs, where allowed), runs two training steps (the first allocates
the optimizer's state) and reads the peak (VmHWM). Reported: the peak RSS of the process during the
steps (the figure compared), what the steps add over the RSS before them (activations, gradients,
optimizer state: the part a tuner controls), and the RSS before them (imports and the model).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def child(kind: str, arch: str, dropout: float) -> dict:
    from common import StepCase, batch, build_case

    case = StepCase(build_case(kind, arch, dropout), batch())
    build_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    before = _status_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS: what follows measures the steps alone
        reset = True
    except OSError:
        reset = False
    case.run(2)
    step_peak = _status_kib("VmHWM")
    return {
        "rss_before_step_mib": before / 1024,
        "step_peak_mib": step_peak / 1024,
        "step_growth_mib": (step_peak - before) / 1024,
        "build_peak_mib": build_peak / 1024,
        "process_peak_mib": max(step_peak, build_peak) / 1024,
        "hwm_reset": reset,
    }


def measure(kind: str, arch: str, dropout: float) -> dict:
    cmd = [sys.executable, os.path.join(HERE, "bench_memory.py"), "--child", kind, arch, str(dropout)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(archs: list[str], dropouts: tuple[float, ...] = (0.0, 0.05), log=print) -> dict:
    from common import libraries

    results = {}
    for arch in archs:
        cases = [("full", 0.0)] + [(k, d) for d in dropouts for k in libraries()]
        for kind, dropout in cases:
            name = f"{arch} {kind}" + ("" if kind == "full" else f" p={dropout}")
            results[name] = measure(kind, arch, dropout)
            r = results[name]
            log(
                f"[memory] {name}: step peak {r['step_peak_mib']:.0f} MiB (+{r['step_growth_mib']:.0f} over "
                f"{r['rss_before_step_mib']:.0f} before the steps)"
            )
    return results


def rows(results: dict) -> list[dict]:
    out = []
    for name, r in results.items():
        out.append(
            dict(
                section="memory",
                metric=f"{name}: peak RSS of a training step",
                value=r["step_peak_mib"],
                unit="MiB",
                detail=f"the steps add {r['step_growth_mib']:.0f} MiB to "
                f"{r['rss_before_step_mib']:.0f} MiB (imports + model)",
            )
        )
    for name in results:
        if " ours " in name:
            peft_name = name.replace(" ours ", " peft ")
            if peft_name in results:
                out.append(
                    dict(
                        section="memory",
                        metric=f"{name.replace(' ours', '')}: step peak RSS ours / peft",
                        value=results[name]["step_peak_mib"] / results[peft_name]["step_peak_mib"],
                        unit="x",
                        target=1.0,
                        detail=f"added by the steps: ours "
                        f"{results[name]['step_growth_mib']:.0f} MiB, peft "
                        f"{results[peft_name]['step_growth_mib']:.0f} MiB",
                    )
                )
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", nargs=3, metavar=("KIND", "ARCH", "DROPOUT"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--arch", nargs="+", default=["gpt2", "llama"])
    args = parser.parse_args()
    if args.child:
        sys.path.insert(0, HERE)
        kind, arch, dropout = args.child
        print(json.dumps(child(kind, arch, float(dropout))))
        return
    for row in rows(run(args.arch)):
        print(f"{row['metric']:<60} {row['value']:.3f} {row['unit']}  {row.get('detail', '')}")


if __name__ == "__main__":
    main()
