"""Ratios measured side by side within one run, and the Markdown table BENCHMARKS.md quotes."""
from __future__ import annotations


# (numerator, denominator, name) of images/s ratios; for code/int, images/s of int over code is
# the time of code over int.
RATIO_PAIRS = [("beam", "loop", "beam/loop encode"), ("beam-2w", "beam", "beam-2w/beam"),
               ("dec-beam", "dec-loop", "beam/loop decode png"),
               ("dec-beam-tfr", "dec-loop-tfr", "beam/loop decode tfrecord"),
               ("beam-int", "beam-code", "encode time code/int"),
               ("dec-beam-int", "dec-beam-code", "decode time code/int")]


def ratios(results: dict, sizes: list) -> dict:
    def ips(n, v):
        return results[n].get(v, {}).get("images_per_s")

    out = {}
    for n in sizes:
        r = {}
        for a, b, name in RATIO_PAIRS + [("beam", "naive-4x", "beam/naive-4x (both on N images)")]:
            if ips(n, a) and ips(n, b):
                r[name] = ips(n, a) / ips(n, b)
        out[n] = r
    # Steady rates: the slope between two sizes of the same variant, so start-up (Python, TensorFlow,
    # the model, pipeline construction) cancels out.
    def slope(a, b):
        return (b["images"] - a["images"]) / max(b["wall_s"] - a["wall_s"], 1e-9)

    steady = {}
    first = results[sizes[0]]
    if "naive" in first and "naive-4x" in first:
        steady["naive"] = slope(first["naive"], first["naive-4x"])
    if len(sizes) == 2:
        for v in results[sizes[1]]:
            if v in first:
                steady[v] = slope(first[v], results[sizes[1]][v])
    out["steady"] = steady
    s_ratios = {}
    # naive's steady rate comes from its own two sizes (naive, naive-4x).
    for a, b, name in RATIO_PAIRS + [("beam", "naive", "beam/naive")]:
        if a in steady and b in steady:
            s_ratios[name] = steady[a] / steady[b]
    out["steady_ratios"] = s_ratios
    if len(sizes) == 2:
        small, big = sizes
        out["growth"] = {v: {"time_ratio": results[big][v]["wall_s"] / results[small][v]["wall_s"],
                             "memory_ratio": results[big][v]["peak_rss_mb"] / results[small][v]["peak_rss_mb"]}
                         for v in results[big] if v in results[small]}
    return out


def markdown(report: dict) -> str:
    lines = ["| images | variant | images/s | wall s | peak RSS MB |", "|---:|---|---:|---:|---:|"]
    for n in report["sizes"]:
        for v, m in report["results"][n].items():
            lines.append(f"| {m['images']:,} | {v} | {m['images_per_s']:,.0f} | {m['wall_s']:.1f} | "
                         f"{m['peak_rss_mb']:,.0f} |")
    lines += ["", "| ratio | value |", "|---|---:|"]
    for n in report["sizes"]:
        for name, value in report["ratios"][n].items():
            lines.append(f"| {name} (N={n:,}, whole process) | {value:.2f} |")
    for name, value in report["ratios"].get("steady_ratios", {}).items():
        lines.append(f"| {name} (steady rate) | {value:.2f} |")
    steady = report["ratios"].get("steady", {})
    if steady:
        lines += ["", "| variant | steady images/s (slope between sizes) |", "|---|---:|"]
        lines += [f"| {v} | {r:,.0f} |" for v, r in steady.items()]
    growth = report["ratios"].get("growth", {})
    if growth:
        lines += ["", "| growth | value |", "|---|---:|"]
    for v, g in growth.items():
        lines.append(f"| {v}: time at 10N / time at N | {g['time_ratio']:.2f} |")
        lines.append(f"| {v}: peak memory at 10N / at N | {g['memory_ratio']:.2f} |")
    return "\n".join(lines)
