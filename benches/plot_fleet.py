#!/usr/bin/python3
"""Plots the fleet benchmark's connection attempts per second, with and without
backoff jitter, on the same axes, the PostgreSQL outage shaded.

    /usr/bin/python3 benches/plot_fleet.py docs/fleet-reconnects.png target/fleet [DIR ...]

Reads events.csv, samples.csv and runs.csv written by `cargo bench --bench fleet`
(FLEET_OUT) from each DIR; one panel per phase-2 run (jitter, no-jitter, jitter-aligned,
no-jitter-aligned) found, with the clients waiting in PgBouncer's queue (SHOW POOLS
cl_waiting) on the right axis. Also writes the per-second series next to the PNG
(same name, .csv). Needs python3-matplotlib (Debian package).
"""
import csv
import sys
from collections import Counter

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LABELS = {
    "jitter": "backoff_jitter = true, gateways' rounds at random phases",
    "no-jitter": "backoff_jitter = false, gateways' rounds at random phases",
    "jitter-aligned": "backoff_jitter = true, gateways' rounds in step",
    "no-jitter-aligned": "backoff_jitter = false, gateways' rounds in step",
}


def main():
    if len(sys.argv) < 3:
        sys.exit("usage: plot_fleet.py OUTPUT.png FLEET_OUT_DIR [DIR ...]")
    dst, dirs = sys.argv[1], sys.argv[2:]
    runs, attempts, fails, oks, waiting, gateways = {}, {}, {}, {}, {}, set()
    for src in dirs:
        with open(f"{src}/runs.csv", newline="") as f:
            for r in csv.DictReader(f):
                if r["run"] in LABELS:
                    runs[r["run"]] = r
                    attempts[r["run"]], fails[r["run"]], oks[r["run"]] = Counter(), Counter(), Counter()
                    waiting[r["run"]] = {}
        with open(f"{src}/events.csv", newline="") as f:
            for e in csv.DictReader(f):
                gateways.add(e["gateway"])
                if e["run"] not in attempts:
                    continue
                second = int(float(e["t"]) // 1)
                {"connect": attempts, "fail": fails, "ok": oks}.get(e["event"], {}).setdefault(
                    e["run"], Counter()
                )[second] += 1
        with open(f"{src}/samples.csv", newline="") as f:
            for s in csv.DictReader(f):
                if s["run"] in waiting:
                    second = int((float(s["t"]) - float(runs[s["run"]]["down_s"])) // 1)
                    w = waiting[s["run"]]
                    w[second] = max(w.get(second, 0), int(s["cl_waiting"]))
    present = [n for n in LABELS if n in runs]
    if not present:
        sys.exit("no phase-2 run found in runs.csv")
    # From shortly before the stop: the workers' first connections (at start_s) are not
    # part of the outage.
    lo = -5
    hi = max(int(float(runs[n]["drained_s"])) + 10 for n in present)
    fig, axes = plt.subplots(
        len(present), 1, sharex=True, sharey=True, figsize=(9, 2.1 * len(present) + 0.8), dpi=80
    )
    if len(present) == 1:
        axes = [axes]
    xs = list(range(lo, hi + 1))
    with open(dst.rsplit(".", 1)[0] + ".csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "second", "connect_attempts", "failed_rounds", "ok_rounds", "max_cl_waiting"])
        for name in present:
            for x in xs:
                w.writerow(
                    [name, x, attempts[name].get(x, 0), fails[name].get(x, 0), oks[name].get(x, 0),
                     waiting[name].get(x, "")]
                )
    for ax, name in zip(axes, present):
        r = runs[name]
        up, drained = float(r["up_s"]), float(r["drained_s"])
        ax.bar(xs, [attempts[name].get(x, 0) for x in xs], width=1.0, align="edge", color="#3b6ea5")
        ax.axvspan(0, up, color="#d62728", alpha=0.12, label="PostgreSQL down")
        ax.axvline(drained, color="#2ca02c", ls="--", lw=1, label="outage backlog drained")
        ax.set_title(
            f"{LABELS[name]}: peak {r['peak_1s']}/s, {r['peak_100ms']}/100 ms; "
            f"drained {drained - up:.0f} s after PostgreSQL returned",
            fontsize=8,
        )
        ax.set_ylabel("attempts / s", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(axis="y", alpha=0.3)
        queue = sorted((x, v) for x, v in waiting[name].items() if lo <= x <= hi)
        twin = ax.twinx()
        twin.plot([x + 0.5 for x, _ in queue], [v for _, v in queue], color="#ff7f0e", lw=1,
                  label="clients waiting in PgBouncer (right)")
        twin.set_ylim(0, max(len(gateways), 1))
        twin.tick_params(labelsize=7)
        handles = ax.get_legend_handles_labels()
        extra = twin.get_legend_handles_labels()
        ax.legend(handles[0] + extra[0], handles[1] + extra[1], fontsize=7, loc="upper right")
    axes[-1].set_xlabel(
        "seconds since PostgreSQL stopped (PgBouncer stays up); bars: connection attempts per second",
        fontsize=8,
    )
    fig.suptitle(
        f"{len(gateways)} gateways' sync workers behind PgBouncer (transaction pooling, pool 20)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(dst, dpi=80)


if __name__ == "__main__":
    main()
