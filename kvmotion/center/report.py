"""A migration task's report: its per-pass telemetry as a chart (PNG) and a document (JSON).

Pure rendering of a task as the center returns it (``task_dict``): remaining memory, the guest's
dirty rate, the stream's throughput and the CPU brake over time, with the convergence engine's
decisions marked, and the prediction beside the actual figures when the task has one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never a display

import matplotlib.pyplot as plt

MIB = 2**20


def report_document(task: dict[str, Any]) -> dict[str, Any]:
    """The JSON report: the request, timeline, samples, decisions, prediction and actual."""
    summary = task.get("summary") or {}
    return {
        "task": task["id"],
        "vm": task["target"],
        "state": task["state"],
        "request": task.get("request"),
        "timeline": task.get("timeline"),
        "samples": task.get("samples"),
        "decisions": summary.get("decisions", []),
        "predicted": summary.get("predicted"),
        "actual": {
            k: summary.get(k)
            for k in ("total_time_ms", "downtime_ms", "passes", "transferred_bytes", "task_time_ms")
        },
        "error": task.get("error"),
    }


def write_report(task: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Write ``task-<id>.png`` and ``task-<id>.json`` into ``out_dir``; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = report_document(task)
    json_path = out_dir / f"task-{task['id']}.json"
    json_path.write_text(json.dumps(doc, indent=2))
    png_path = out_dir / f"task-{task['id']}.png"
    samples = task.get("samples") or []
    t = [float(s["t"]) for s in samples]
    fig, (mem, brake) = plt.subplots(
        2, 1, figsize=(9, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    mem.plot(t, [s["remaining_bytes"] / MIB for s in samples], "o-", label="remaining (MiB)")
    mem.plot(t, [s["dirty_rate_bps"] / MIB for s in samples], "s-", label="dirty rate (MiB/s)")
    mem.plot(t, [s["throughput_bps"] / MIB for s in samples], "^-", label="throughput (MiB/s)")
    for d in doc["decisions"]:
        mem.axvline(float(d["t_s"]), color="grey", linestyle=":", linewidth=0.8)
    mem.set_ylabel("MiB, MiB/s")
    mem.legend(loc="upper right")
    actual = doc["actual"]
    mem.set_title(
        f"task {task['id']}: {task['target']} {task['state']}; downtime "
        f"{actual['downtime_ms']} ms, {actual['passes']} passes, "
        f"{(actual['total_time_ms'] or 0) / 1000:.1f} s"
    )
    brake.step(t, [s["throttle_pct"] for s in samples], where="post", label="CPU brake (%)")
    brake.set_ylim(0, 100)
    brake.set_ylabel("brake %")
    brake.set_xlabel("seconds since the migration started")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path, json_path
