"""benchmarks/results/replay.json (from replay_all.py) -> the markdown tables of benchmarks/replay.md.

    PYTHONPATH=. python benchmarks/replay_table.py [benchmarks/results/replay.json]
"""

import json
import sys
from pathlib import Path


def _f(x, nd=1):
    return f"{x:.{nd}f}"


def tiers_table(results, kind):
    out = ["| calibrate -> replay | backend | tokens | padding % (mean / worst layer) | overflow % (worst) "
           "| spill % | cold % | program calls / call (x groups, worst) | offloaded % | time / MLX |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in (r for r in results if r["kind"] == kind):
        name = " + ".join(r["calibrate"]) + ("" if r["split"] else " -> " + " + ".join(r["routes"]))
        for n, s in r["summary"].items():
            out.append(f"| {name} | {r['backend']} | {n} | {_f(s['padding_pct'])} / {_f(s['max_padding_pct'])} "
                       f"| {_f(s['max_overflow_pct'], 2)} | {_f(s['spill_pct'], 2)} | {_f(s['cold_pct'])} "
                       f"| {_f(s['program_calls_per_call'])} ({_f(s['max_calls_over_groups'], 2)}) "
                       f"| {_f(s['offloaded_pct'], 0)} | {_f(s['time_ratio'], 3)} |")
    return "\n".join(out)


def chips_table(results):
    rows = {}
    for r in (r for r in results if r["kind"] == "chip"):
        key = (r["chip"], r["shape"], r["calibrate"][0])
        s = r["summary"]["2048"]
        rows.setdefault(key, {})[(r["objective"], r["energy_bound"])] = s
    out = ["| chip | shape | trace | time obj: time / GPU | its energy / GPU | energy obj (<=1.2x time obj): energy / GPU "
           "| its time / time obj | energy obj (<=1.2x GPU time): energy / GPU | its time / GPU |",
           "|---|---|---|---|---|---|---|---|---|"]
    for (chip, shape, trace), v in rows.items():
        t, e, g = v[("time", "time")], v[("energy", "time")], v[("energy", "gpu")]
        out.append(f"| {chip} | {shape} | {trace} | {_f(t['time_ratio'], 3)} | {_f(t['energy_ratio'], 3)} "
                   f"| {_f(e['energy_ratio'], 3)} | {_f(e['predicted_s'] / t['predicted_s'], 2)} "
                   f"| {_f(g['energy_ratio'], 3)} | {_f(g['time_ratio'], 3)} |")
    # per chip: worst over traces
    out += ["", "| chip | time obj: worst time / GPU | energy obj (time bound): worst energy / GPU | "
            "energy obj (GPU bound): worst energy / GPU | worst time / GPU |", "|---|---|---|---|---|"]
    chips = sorted({k[0] for k in rows}, key=lambda c: list(dict.fromkeys(k[0] for k in rows)).index(c))
    for chip in chips:
        vs = [v for k, v in rows.items() if k[0] == chip]
        out.append(f"| {chip} | {_f(max(v[('time', 'time')]['time_ratio'] for v in vs), 3)} "
                   f"| {_f(max(v[('energy', 'time')]['energy_ratio'] for v in vs), 3)} "
                   f"| {_f(max(v[('energy', 'gpu')]['energy_ratio'] for v in vs), 3)} "
                   f"| {_f(max(v[('energy', 'gpu')]['time_ratio'] for v in vs), 3)} |")
    return "\n".join(out)


def main():
    path = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "results" / "replay.json")
    d = json.loads(path.read_text())
    res = d["results"]
    print("### Tiers on real routing (--split half)\n")
    print(tiers_table(res, "split"))
    print("\n### Across domains (plan on some traces, replay others)\n")
    print(tiers_table(res, "cross"))
    print("\n### Concurrent residency per chip (coreml, 2048-token calls, --split half)\n")
    print(chips_table(res))
    print(f"\n({len(res)} replays on {d['machine']}, {d['seconds']} s)")


if __name__ == "__main__":
    main()
