#!/usr/bin/env python3
"""Markdown tables (one per SMTP workload) from a run_matrix.py result prefix:

    python3 bench/md_tables.py bench/results/smtp-final [--target mailgw] [--delivered]

Reads PREFIX.summary.json (medians, min-max range) and PREFIX.ratios.json (target / peer) and
prints, per workload: every server's median msgs/s (± half the min-max range), delivered
msgs/s, p50/p99 latency, server CPU ms/msg, other-CPU (noise), and the target's ratio to
each peer (msgs/s: >1 = target faster; p50, p99, CPU: <1 = target faster / cheaper), with
the min-max of the per-repetition ratios in brackets. --delivered adds the ratio of delivered
msgs/s (until in the Maildir / counted by smtp-sink), the figure that matters for relaying.
"""
import argparse
import json


def fmt(v, digits=3):
    if v is None:
        return "–"
    a = abs(v)
    if a >= 100:
        return f"{v:.0f}"
    return f"{v:.{digits}g}"


def pm(row, key):
    v = row.get(key)
    if v is None:
        return "–"
    r = row.get(key + "_range_pct")
    return fmt(v) + (f" (±{r / 2:.0f}%)" if r is not None else "")


def ratio(r, key):
    if not r or key not in r:
        return "–"
    s = f"{r[key]:.2f}"
    if key + "_rep_min" in r:
        s += f" [{r[key + '_rep_min']:.2f}–{r[key + '_rep_max']:.2f}]"
    return s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("prefix")
    ap.add_argument("--target", default="mailgw")
    ap.add_argument("--delivered", action="store_true", help="add the delivered msgs/s ratio")
    a = ap.parse_args()
    rows = json.load(open(a.prefix + ".summary.json"))
    rats = json.load(open(a.prefix + ".ratios.json"))
    workloads = list(dict.fromkeys(r["scenario"] for r in rows if r["kind"] == "smtp"))
    for w in workloads:
        print(f"\n#### {w}\n")
        dcol = " delivered/s |" if a.delivered else ""
        print("| server | msgs/s (±½-range) | delivered msgs/s | p50 ms | p99 ms | server CPU ms/msg "
              f"| other-CPU s | {a.target}/this: msgs/s |{dcol} p50 | p99 | CPU ms/msg |")
        print("|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if a.delivered else ""))
        wr = [r for r in rows if r["kind"] == "smtp" and r["scenario"] == w]
        wr.sort(key=lambda r: (r["role"] != "target", r["peer"]))
        for r in wr:
            rr = next((x for x in rats if x["scenario"] == w and x["target"] == a.target
                       and x["peer"] == r["peer"]), None)
            name = f"**{r['peer']}**" if r["role"] == "target" else r["peer"]
            dcell = f" {ratio(rr, 'delivered_msgs_per_s')} |" if a.delivered else ""
            print(f"| {name} | {pm(r, 'msgs_per_s')} | {pm(r, 'delivered_msgs_per_s')} "
                  f"| {pm(r, 'lat_p50_ms')} | {pm(r, 'lat_p99_ms')} | {pm(r, 'server_cpu_ms_per_msg')} "
                  f"| {fmt(r.get('other_cpu_s'), 2)} "
                  f"| {ratio(rr, 'msgs_per_s')} |{dcell} {ratio(rr, 'lat_p50_ms')} | {ratio(rr, 'lat_p99_ms')} "
                  f"| {ratio(rr, 'server_cpu_ms_per_msg')} |")


if __name__ == "__main__":
    main()
