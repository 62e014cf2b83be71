"""The end-of-sweep report: `report.csv`, `report.md` and `report.png` (metric vs trainable
parameters) in the sweep dir, built from each job's `metrics.json`."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("lightning_peft.app")

COLUMNS = (
    "job",
    "status",
    "tuner",
    "overrides",
    "trainable_params",
    "metric_name",
    "metric",
    "wall_time_s",
    "peak_memory_mb",
    "error",
)
ERROR_CHARS = 300  # a failed job's error, on one line, cut to this many characters (the job's log has all of it)


def _read_metrics(path: Path) -> dict[str, Any]:
    """A job's metrics, or {} (a failed job) when the file is missing, unreadable or not a JSON object."""
    if not path.exists():
        return {}
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # ValueError: invalid JSON or UTF-8 (a job killed while writing)
        log.warning("sweep report: %s is unreadable (%s); the job is listed as failed", path, err)
        return {}
    if not isinstance(m, dict):
        log.warning("sweep report: %s holds no JSON object; the job is listed as failed", path)
        return {}
    return m


def _error(m: dict[str, Any]) -> str:
    """Why a job failed: the error its metrics.json records (train.py's multirun writes one for a job that
    raised), else that there are no readable metrics; "" for a job that finished."""
    if "error" in m:
        return " ".join(str(m["error"]).split())[:ERROR_CHARS]
    return "" if m else "no readable metrics.json (the job was killed or did not start)"


def collect_rows(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One row per job dir (`<sweep>/<n>/metrics.json`), in job order; a failed job (its metrics.json holds
    the error, or it has none) is listed with status `failed`, its error and empty values, so it is not
    silently dropped."""
    rows = []
    for job_dir in sorted(
        (p for p in Path(sweep_dir).iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)
    ):
        m = _read_metrics(job_dir / "metrics.json")
        error = _error(m)
        rows.append(
            {
                "job": int(job_dir.name),
                "status": "failed" if error else "ok",
                "tuner": m.get("tuner", ""),
                "overrides": " ".join(m.get("overrides", [])),
                "trainable_params": m.get("trainable_params", ""),
                "metric_name": m.get("monitor", ""),
                "metric": "" if m.get("metric") is None else round(float(m["metric"]), 4),
                "wall_time_s": m.get("wall_time_s", ""),
                "peak_memory_mb": m.get("peak_cuda_mb", m.get("peak_rss_mb", "")),
                "error": error,
            }
        )
    return rows


def _markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(str(r[c]).replace("|", "\\|") for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on CI machines
    import matplotlib.pyplot as plt

    points = [r for r in rows if r["metric"] != "" and r["trainable_params"] not in ("", None)]
    # label each point by what differs between jobs, not the overrides they all share
    shared = set.intersection(*(set(r["overrides"].split()) for r in points)) if points else set()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for r in points:
        label = " ".join(o for o in r["overrides"].split() if o not in shared) or r["tuner"]
        ax.scatter(r["trainable_params"], r["metric"])
        ax.annotate(label, (r["trainable_params"], r["metric"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if points and min(r["trainable_params"] for r in points) > 0:
        ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    names = sorted({r["metric_name"] for r in points})
    ax.set_ylabel(", ".join(names) or "metric")
    ax.set_title("metric vs trainable parameters")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(sweep_dir: str | Path) -> Optional[list[dict[str, Any]]]:
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        return None
    rows = collect_rows(sweep_dir)
    with open(sweep_dir / "report.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    (sweep_dir / "report.md").write_text(_markdown(rows))
    _plot(rows, sweep_dir / "report.png")
    return rows


class SweepReport(Callback):
    """Hydra callback (configs/train.yaml: hydra.callbacks.sweep_report)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = write_report(sweep_dir)
        if rows is not None:
            failed = [r["job"] for r in rows if r["status"] == "failed"]
            if failed:
                log.error("sweep report: job(s) %s failed (see the error column)", ", ".join(map(str, failed)))
            log.info("sweep report (%d jobs): %s\n%s", len(rows), sweep_dir / "report.md", _markdown(rows))
