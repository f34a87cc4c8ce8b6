"""Balancing (DRS) at scale, in the simulator: 1,000 hosts, 10,000 VMs, a skewed start.

The pure pass (kvmotion/migration/balance.py) over a cluster where a fifth of the hosts run
three times the VMs of the others (a rack filled first, as happens after a maintenance round):
- **one pass**: its time (median of 3) with the default 8 moves a pass, and with 64;
- **passes until it rests**: the simulator applies each pass's moves before the next one (the
  hold time long past), up to 400 passes; reported per threshold: the moves made, the imbalance
  from start to end, and how much each move lowered it on average (the first moves most).

Goal (issue 17): a pass in under a second at this size.

Run: ``.venv/bin/python -m bench.balancing``. Writes bench/results/balancing.json and .md.
No lab, no root.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

from kvmotion.migration.balance import Settings, VmLoad, balance, simulate
from kvmotion.migration.placement import Capacity, Cluster
from kvmotion.migration.precheck import HostView, VmView

RESULTS = Path(__file__).resolve().parent / "results"
COMMAND = ".venv/bin/python -m bench.balancing"
HOSTS, VMS = 1000, 10_000


def skewed(seed: int = 7) -> tuple[Cluster, dict[str, VmView], dict[str, VmLoad]]:
    rng = random.Random(seed)
    names = [f"10.0.{i // 250}.{i % 250}" for i in range(HOSTS)]
    hot = names[: HOSTS // 5]
    views = {
        n: HostView(n, True, f"10.1.{i // 250}.{i % 250}", frozenset({"shared"}),
                    frozenset({"vm-network"}), 512 * 2**30, "kvm", "GenuineIntel")
        for i, n in enumerate(names)
    }  # fmt: skip
    capacity = {n: Capacity(cpus=32, memory_mib=256 * 1024) for n in names}
    vms: dict[str, VmView] = {}
    load: dict[str, VmLoad] = {}
    for i in range(VMS):
        # a hot host gets three VMs for each one a cold host gets
        host = rng.choice(hot) if rng.random() < 3 / 7 else rng.choice(names[len(hot) :])
        memory = rng.choice((1024, 2048, 4096, 8192))
        vcpus = rng.choice((1, 2, 4))
        name = f"vm-{i}"
        vms[name] = VmView(name, host, "poweredOn", ("shared",), ("vm-network",), memory,
                           "qemu64", vcpus=vcpus)  # fmt: skip
        capacity[host] = capacity[host].plus(vcpus, memory)
        busy = rng.betavariate(2, 5) * vcpus  # most VMs idle-ish, some busy
        load[name] = VmLoad(busy, memory * rng.uniform(0.3, 0.9), memory / 1024 * 0.9)
    return Cluster(views, capacity), vms, load


def pass_timing(max_moves: int) -> dict[str, Any]:
    cluster, vms, load = skewed()
    runs, result = [], None
    for _ in range(3):
        start = time.perf_counter()
        result = balance(cluster, vms, load, settings=Settings(max_moves=max_moves))
        runs.append(time.perf_counter() - start)
    assert result is not None
    return {
        "max_moves": max_moves,
        "seconds": round(statistics.median(runs), 3),
        "moves": len(result.moves),
        "imbalance": result.imbalance,
        "after": result.after,
    }


def until_rest(threshold: int) -> dict[str, Any]:
    cluster, vms, load = skewed()
    start = time.perf_counter()
    passes = simulate(cluster, vms, load, Settings(threshold=threshold, hold_s=0, max_moves=64),
                      passes=400)  # fmt: skip
    seconds = time.perf_counter() - start
    moves = sum(len(p.moves) for p in passes)
    first, last = passes[0].imbalance, passes[-1].after
    curve = []
    made = 0
    for p in passes:
        made += len(p.moves)
        if made and (not curve or made >= curve[-1][0] * 2):
            curve.append((made, p.after))
    return {
        "threshold": threshold,
        "passes": len(passes),
        "moves": moves,
        "imbalance_start": first,
        "imbalance_end": last,
        "lowered_per_move": round((first - last) / moves, 6) if moves else 0.0,
        "rested": not passes[-1].moves,
        "why": passes[-1].why_no_more,
        "seconds": round(seconds, 1),
        "curve": curve,
    }


def report(out: dict[str, Any]) -> str:
    lines = [
        "# Balancing at scale: the pass in the simulator",
        "",
        f"`{COMMAND}`: {HOSTS:,} hosts (32 CPUs, 256 GiB), {VMS:,} VMs, a fifth of the hosts "
        "running three times the VMs of the others.",
        "",
        "| moves a pass at most | pass (s, median of 3) | moves | imbalance before -> after |",
        "|---|---|---|---|",
    ]
    for t in out["pass"]:
        lines.append(f"| {t['max_moves']} | {t['seconds']} | {t['moves']} | "
                     f"{t['imbalance']:.4f} -> {t['after']:.4f} |")  # fmt: skip
    lines += [
        "",
        "Passes until it rests (64 moves a pass, each pass's moves made before the next):",
        "",
        "| threshold | passes | moves | imbalance start -> end | imbalance lowered per move | "
        "rested | why |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in out["rest"]:
        lines.append(
            f"| {r['threshold']} | {r['passes']} | {r['moves']} | {r['imbalance_start']:.4f} -> "
            f"{r['imbalance_end']:.4f} | {r['lowered_per_move']:.6f} | {r['rested']} | {r['why']} |"
        )
    lines += ["", "The imbalance after so many moves (threshold 3):", ""]
    for made, imbalance in out["rest"][0]["curve"]:
        lines.append(f"- {made} moves: {imbalance:.4f}")
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    out = {
        "hosts": HOSTS,
        "vms": VMS,
        "pass": [pass_timing(8), pass_timing(64)],
        "rest": [until_rest(3), until_rest(5)],
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "balancing.json").write_text(json.dumps(out, indent=1) + "\n")
    text = report(out)
    (RESULTS / "balancing.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
