"""The tables of bench/train_speed.py: one row per (tree, preset, precision, variant), the median of a row's rounds,
and the speed-up of each working-tree variant over the baseline's plain step."""
from __future__ import annotations

import statistics


def _cell(r, key, fmt):
    return format(r[key], fmt) if r.get(key) is not None else "-"


def format_table(rows: list[dict], peak: dict) -> str:
    head = ("| code | preset | params | precision | variant | repeats | s/step (median) | images/s | first step s "
            "| peak RSS MiB (+step) | GFLOP/step | GFLOP/s | of matmul peak | attention share | SDPA share |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['tree']} | {r['preset']} | | {r['precision']} | {r['variant']} "
                         f"| failed: {r['error'][:120]} |" + " |" * 9)
            continue
        flops = r.get("preset_flops") or r.get("flops")  # useful FLOPs: recomputation is not counted
        achieved = flops / r["step_s"] if flops else None
        lines.append(
            f"| {r['tree']} | {r['preset']} | {r['parameters'] / 1e6:.2f}M | {r['precision']} | {r['variant']} "
            f"| {r['repeats']} | {r['step_s']:.3f} | {r['images_per_s']:.2f} | {_cell(r, 'first_step_s', '.1f')} "
            f"| {r['peak_rss_mib']:.0f} (+{r['step_rss_mib']:.0f}) "
            f"| {flops / 1e9:.2f} | {achieved / 1e9:.1f} | {achieved / peak['peak_' + r['precision'] + '_flops']:.1%} "
            if flops else
            f"| {r['tree']} | {r['preset']} | {r['parameters'] / 1e6:.2f}M | {r['precision']} | {r['variant']} "
            f"| {r['repeats']} | {r['step_s']:.3f} | {r['images_per_s']:.2f} | {_cell(r, 'first_step_s', '.1f')} "
            f"| {r['peak_rss_mib']:.0f} (+{r['step_rss_mib']:.0f}) | - | - | - ")
        lines[-1] += (f"| {_cell(r, 'attention_share', '.1%')} | {_cell(r, 'sdpa_share', '.1%')} |")
    return "\n".join(lines)


def merge_rounds(rounds: list[dict]) -> dict:
    """One row from a row's rounds: the round with the median s/step (the lower middle one of an even count), its
    images/s and the profile of whichever round was profiled; ``round_images_per_s`` keeps every round's figure."""
    ok = [r for r in rounds if "error" not in r]
    if not ok:
        return rounds[0]
    middle = sorted(ok, key=lambda r: r["step_s"])[(len(ok) - 1) // 2]
    merged = {**next((r for r in ok if "flops" in r), {}), **middle}
    merged["round_images_per_s"] = [r["images_per_s"] for r in ok]
    return merged


def format_speedups(rows: list[dict]) -> str:
    """Per (preset, precision): the baseline's plain images/s, each working-tree variant's (median rounds), and the
    speed-up: the median over rounds of round i's ratio, with the smallest and largest of those ratios."""
    ok = [r for r in rows if "error" not in r]
    lines = ["| preset | precision | baseline plain images/s | variant | images/s | speed-up "
             "| round by round | peak RSS ratio |", "|---|---|---|---|---|---|---|---|"]
    for r in ok:
        if r["tree"] == "baseline":
            continue
        base = next((b for b in ok if b["tree"] == "baseline" and b["variant"] == "plain"
                     and b["preset"] == r["preset"] and b["precision"] == r["precision"]), None)
        if base is None:
            continue
        # Paired by round (round i of each ran minutes apart at most), so a drift of the machine's speed between
        # rounds cancels; with one round this is the plain ratio.
        ratios = [a / b for a, b in zip(r["round_images_per_s"], base["round_images_per_s"])]
        spread = f"{min(ratios):.2f}-{max(ratios):.2f}x" if len(ratios) > 1 else "-"
        lines.append(f"| {r['preset']} | {r['precision']} | {base['images_per_s']:.2f} | {r['variant']} "
                     f"| {r['images_per_s']:.2f} | **{statistics.median(ratios):.2f}x** | {spread} "
                     f"| {r['step_rss_mib'] / base['step_rss_mib']:.2f} |")
    return "\n".join(lines)
