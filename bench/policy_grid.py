"""The convergence policy against the simulator, over the deterministic grid that
docs/convergence.md's "Results of the property tests" table reports (3,024 simulations, about
30 s on 2 cores), or the wide grid around issue 6's counterexample (2,304).

Run: ``.venv/bin/python -m bench.policy_grid table|wide [out.json]``; prints the table's figures
per priority and writes every case's outcome to the JSON file.
"""

# ruff: noqa: E501
from __future__ import annotations

import itertools
import json
import statistics as st
import sys
import time
from multiprocessing import Pool
from typing import Any

from kvmotion.migration.policy import ConvergenceRequest, deadline_for, decide
from kvmotion.migration.predictor import predict
from kvmotion.migration.simulator import Guest, Link, simulate

MiB, GiB = 2**20, 2**30


def maxthr(r):
    return max((d.knobs.throttle_pct for _, d in r.decisions), default=0)


def reversals(r):
    th = [d.knobs.throttle_pct for _, d in r.decisions]
    steps = [b - a for a, b in itertools.pairwise(th) if b != a]
    first = next((i for i, s in enumerate(steps) if s < 0), len(steps))
    return any(s > 0 for s in steps[first:])


def one(case):
    ram, nz, ws, factor, link, dt, prio, defaults = case
    req = ConvergenceRequest(dt, None, prio, False)
    g = Guest(ram, nz, factor * link, ws)
    dl = deadline_for(req, ram, link)
    r = simulate(g, Link(link), req, decide, dl, poll_s=1.0)
    p = predict(ram, nz, g.dirty_rate_bps, ws, link, req)
    out = dict(
        case=case,
        conv=r.converged,
        total=r.total_s,
        down=r.downtime_ms,
        outcome=r.outcome,
        thr=maxthr(r),
        rev=reversals(r),
        dl=dl,
        phys=nz / link,
        p_conv=p.converges,
        p_total=p.total_s,
        p_brake=p.needs_brake,
        p_down=p.downtime_ms,
    )
    if defaults:
        d = simulate(g, Link(link), req, None, dl, poll_s=1.0)
        out.update(d_conv=d.converged, d_down=d.downtime_ms)
    return out


def table_cases():
    for ram, nzf, wsf, factor, mbit, dt, prio in itertools.product(
        [256 * MiB, GiB, 4 * GiB, 8 * GiB],
        [0.25, 1.0],
        [0.05, 0.25, 1.0],
        [0, 0.25, 0.5, 0.9, 1.5, 2, 4],
        [100, 1000, 10000],
        [20, 100, 1000],
        ["normal", "high"],
    ):
        nz = int(ram * nzf)
        yield (ram, nz, int(nz * wsf), factor, mbit * 1e6 / 8, dt, prio, True)


def wide_cases():
    for ram, wsf, factor, mbit, dt, prio in itertools.product(
        [256 * MiB, 512 * MiB, 1 * GiB],
        [0.25, 0.4, 0.55, 0.7, 0.8, 0.87890625, 0.9375, 1.0],
        [1.5, 2, 2.5, 3, 3.5625, 4, 5, 6],
        [100, 1000],
        [20, 100, 1000],
        ["normal", "high"],
    ):
        nz = ram if wsf == 1.0 else int(ram * 0.9375)
        yield (ram, nz, int(ram * wsf), factor, mbit * 1e6 / 8, dt, prio, False)


def report(res: list[dict[str, Any]]) -> None:
    def fmt(xs):
        return f"{st.median(xs):.2f} ({max(xs):.1f})" if xs else "-"

    for prio in ["normal", "high"]:
        R = [r for r in res if r["case"][6] == prio]
        conv = [r for r in R if r["conv"]]
        within = [r for r in conv if r["down"] <= r["case"][5]]
        dconv = [r for r in R if r["d_conv"]]
        dwithin = [r for r in dconv if r["d_down"] <= r["case"][5]]
        heavy = [
            r
            for r in R
            if r["case"][3] >= 2
            and r["case"][2] >= max(32 * MiB, 0.5 * min(r["case"][4], 128 * MiB))
        ]
        idle = [r["total"] / r["phys"] for r in R if r["case"][3] == 0]
        light = [
            r["total"] / r["phys"]
            for r in R
            if r["case"][3] in (0.25, 0.5) and r["thr"] == 0 and r["conv"]
        ]
        braked = [
            r["total"] / r["phys"] for r in R if r["thr"] > 0 and r["phys"] >= 1 and r["conv"]
        ]
        deep = {f: [r["thr"] for r in R if r["case"][3] == f] for f in (1.5, 2, 4)}
        deepb = {
            f: [r["thr"] for r in R if r["case"][3] == f and r["thr"] > 0] for f in (1.5, 2, 4)
        }
        longest = max(r["total"] / r["dl"] for r in conv)
        rev = sum(r["rev"] for r in R)
        nob = [r for r in R if r["thr"] == 0]
        wb = [r for r in R if r["thr"] > 0]

        def err(r):
            return abs(r["p_total"] - r["total"]) / r["total"]

        nob20 = sum(err(r) <= 0.2 for r in nob)
        nob20b = sum(abs(r["p_total"] - r["total"]) <= max(0.2 * r["total"], 0.1) for r in nob)
        wb20 = sum(err(r) <= 0.2 for r in wb)
        wbmax = max((err(r) for r in wb), default=0)
        agree_brake = sum(r["p_brake"] == (r["thr"] > 0) for r in R)
        print(f"== {prio}: {len(R)} cases")
        print(f"converge {len(conv)}; within downtime {len(within)}")
        print(f"defaults converge / within {len(dconv)} / {len(dwithin)}")
        print(
            f"heavy {len(heavy)}: defaults {sum(r['d_conv'] for r in heavy)} / policy {sum(r['conv'] for r in heavy)}"
        )
        print(f"idle total/phys median (max) {fmt(idle)}")
        print(f"light no brake {len(light)}: {fmt(light)}")
        print(f"braked phys>=1s {len(braked)}: {fmt(braked)}")
        print(
            "deepest brake median all:",
            {f: st.median(v) for f, v in deep.items()},
            "braked only:",
            {f: st.median(v) if v else None for f, v in deepb.items()},
        )
        print(f"longest/deadline {longest:.3f}; reversals {rev}")
        print(f"no brake {len(nob)}: within 20% {nob20}, within 20%/0.1s {nob20b}")
        print(
            f"with brake {len(wb)}: within 20% {wb20}, max err {wbmax * 100:.3f} %, verdict agree {sum(r['p_conv'] == r['conv'] for r in wb)}"
        )
        print(f"brake needed agree {agree_brake}")


def main() -> None:
    which = sys.argv[1] if len(sys.argv) > 1 else "table"
    cases = list(table_cases() if which == "table" else wide_cases())
    t0 = time.time()
    with Pool(2) as pool:
        res = pool.map(one, cases, chunksize=8)
    print(f"{len(res)} cases in {time.time() - t0:.0f} s", file=sys.stderr)
    if len(sys.argv) > 2:
        with open(sys.argv[2], "w") as f:
            json.dump(res, f)
    if which == "table":
        report(res)


if __name__ == "__main__":
    main()
