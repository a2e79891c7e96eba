"""Turn pytest-benchmark JSON files into a Markdown report and a PNG chart.

    python benchmarks/report.py results.json [more.json ...] --md out.md --png out.png [--title T] [--note N]

Input: files written by ``pytest benchmarks/... --benchmark-json=FILE``. Several files are merged; an entry
that appears in several files (same group and variant) is *pooled*: its per-round times (``times_ms``) are
concatenated and the median and p20/p80 recomputed, so repeated passes of a suite on a noisy machine
alternate the variants at the granularity of passes (entries without ``times_ms``: the later file wins). Entries from ``benchmarks/conftest.py``
carry their numbers in ``extra_info`` (median and p20/p80 of the per-round times, img/s, peak memory,
% of the roofline floor on GPU); entries from other benchmark files fall back to pytest-benchmark's own
statistics (median, q1/q3) and their ``provider`` name.

Output:

* Markdown: the machine/version stamp; a summary (per case and mode: the fastest resfuse variant against
  ``eager``, ``eager_cl``, ``compile`` and the best compile variant, and its peak memory against eager's);
  then per suite one table — case, mode, variant, median ms (p20–p80), img/s, ×eager, ×compile,
  peak MiB (and % of floor where measured). ×X = (median of X) / (median of this variant) in the same group:
  above 1 means faster than X.
* PNG (matplotlib, Agg): one panel per suite, horizontal bars of the speed-up over ``eager`` (eager median /
  variant median, log scale; the line at 1 is eager) for every other variant of every case and mode.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from collections import OrderedDict

VARIANT_ORDER = ("eager", "eager_cl", "compile", "compile-max-autotune", "compile-freezing",
                 "resfuse-cpu", "resfuse-triton", "resfuse-cuda")
SUITE_ORDER = ("ops", "blocks", "models")


# -- loading ---------------------------------------------------------------------------------------------------
def _row(b: dict) -> dict:
    e = b.get("extra_info") or {}
    st = b.get("stats") or {}
    group = b.get("group") or b.get("name")
    parts = group.split("/")
    med = e.get("median_ms")
    if med is None and st.get("median") is not None:
        med = st["median"] * 1e3
    p20, p80 = e.get("p20_ms"), e.get("p80_ms")
    if p20 is None and st.get("q1") is not None:  # not from our conftest: quartiles instead
        p20, p80 = st["q1"] * 1e3, st["q3"] * 1e3
    variant = e.get("variant") or e.get("provider") or (b.get("param") or b.get("name"))
    batch = e.get("batch")
    ips = e.get("images_per_s") or (batch / (med / 1e3) if batch and med else None)
    return {
        "group": group, "suite": e.get("suite") or (parts[0] if len(parts) > 1 else group.split("-")[0]),
        "case": e.get("case") or (parts[1] if len(parts) > 2 else group),
        "mode": e.get("mode") or (parts[2] if len(parts) > 2 else ""),
        "variant": variant, "median_ms": med, "p20_ms": p20, "p80_ms": p80, "images_per_s": ips,
        "peak_mib": e.get("peak_mib"), "pct_of_floor": e.get("pct_of_floor"), "rel_err": e.get("rel_err_vs_eager"),
        "batch": batch, "extra": e,
    }


def load(paths):
    """(rows, stamp) merged from the JSON files ``paths``."""
    rows: "OrderedDict[tuple, dict]" = OrderedDict()
    stamp = {}
    for p in paths:
        with open(p) as f:
            d = json.load(f)
        env = d.get("resfuse_env") or d.get("resfuse_stamp") or {}
        for k, v in env.items():  # first file: start of the first pass; last file: everything else
            if k in ("loadavg_start", "date", "settings"):
                stamp.setdefault(k, v)
            else:
                stamp[k] = v
        stamp["files"] = stamp.get("files", 0) + 1
        mi = d.get("machine_info") or {}
        stamp.setdefault("cpu", mi.get("cpu_model") or (mi.get("cpu") or {}).get("brand_raw"))
        stamp.setdefault("git_commit", (d.get("commit_info") or {}).get("id", "")[:7])
        stamp.setdefault("date", d.get("datetime"))
        for b in d.get("benchmarks", []):
            r = _row(b)
            if r["median_ms"] is None:
                continue
            key = (r["group"], r["variant"])
            old = rows.get(key)
            if old is not None and old["extra"].get("timer") != r["extra"].get("timer"):
                raise SystemExit(f"report.py: {p}: {r['group']} {r['variant']} was timed with "
                                 f"{r['extra'].get('timer')}, an earlier file with {old['extra'].get('timer')}; "
                                 "report them separately")
            if old is not None and old["extra"].get("times_ms") and r["extra"].get("times_ms"):
                r = _pool(old, r)
            rows[key] = r
    return list(rows.values()), stamp


def _pool(a: dict, b: dict) -> dict:
    """One row from two runs of the same benchmark: per-round times merged, statistics recomputed."""
    times = list(a["extra"]["times_ms"]) + list(b["extra"]["times_ms"])
    r = dict(b)
    r["extra"] = dict(b["extra"], times_ms=times, passes=a["extra"].get("passes", 1) + 1)
    r["median_ms"] = statistics.median(times)
    r["p20_ms"], r["p80_ms"] = _percentile(times, 20), _percentile(times, 80)
    if r["batch"]:
        r["images_per_s"] = r["batch"] / (r["median_ms"] / 1e3)
    peaks = [x for x in (a["peak_mib"], b["peak_mib"]) if x is not None]
    r["peak_mib"] = max(peaks) if peaks else None
    return r


def _percentile(xs, q):
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def _order(v):
    return (VARIANT_ORDER.index(v) if v in VARIANT_ORDER else len(VARIANT_ORDER), str(v))


def by_group(rows):
    """``{group: [rows in variant order]}``, groups in suite order, then first appearance."""
    groups: "OrderedDict[str, list]" = OrderedDict()
    for r in sorted(rows, key=lambda r: SUITE_ORDER.index(r["suite"]) if r["suite"] in SUITE_ORDER else 99):
        groups.setdefault(r["group"], []).append(r)
    for g in groups.values():
        g.sort(key=lambda r: _order(r["variant"]))
        base = {r["variant"]: r["median_ms"] for r in g}
        compiles = [base[v] for v in base if str(v).startswith("compile")]
        for r in g:
            r["x_eager"] = base["eager"] / r["median_ms"] if "eager" in base else None
            r["x_eager_cl"] = base["eager_cl"] / r["median_ms"] if "eager_cl" in base else None
            r["x_compile"] = base["compile"] / r["median_ms"] if "compile" in base else None
            r["x_best_compile"] = min(compiles) / r["median_ms"] if compiles else None
            r["eager_peak_mib"] = next((x["peak_mib"] for x in g if x["variant"] == "eager"), None)
    return groups


# -- Markdown ---------------------------------------------------------------------------------------------------
def _f(x, fmt="{:.2f}", none="–"):
    return none if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def _ms(x):
    if x is None:
        return "–"
    return f"{x:.3f}" if x < 1 else f"{x:.2f}" if x < 100 else f"{x:.0f}"


def _x(x):
    if x is None:
        return "–"
    s = f"{x:.2f}×"
    return f"**{s}**" if x >= 1.0 else s


def stamp_lines(stamp) -> list:
    dev = "; ".join(str(x) for x in (stamp.get("gpu"), stamp.get("cpu")) if x)
    load = stamp.get("loadavg_start"), stamp.get("loadavg_end")
    out = [(f"- machine: {dev} ({stamp.get('cpu_count', '?')} cores, {stamp.get('threads', '?')} torch threads), "
            f"host `{stamp.get('host', '?')}`"),
           f"- torch {stamp.get('torch', '?')}, triton {stamp.get('triton', '?')}, resfuse {stamp.get('resfuse', '?')}"
           + (f", CUDA {stamp['cuda']}, cuDNN {stamp.get('cudnn')}, driver {stamp.get('driver')}" if stamp.get("cuda") else ""),
           (f"- commit `{stamp.get('git_commit', '?')}`{' (+ uncommitted changes)' if stamp.get('git_dirty') else ''}, "
            f"date {stamp.get('date', '?')}")]
    if any(load):
        out.append(f"- load average (1, 5, 15 min) at start {load[0]}, at end {load[1]}"
                   + (f"; {stamp['files']} result files pooled" if stamp.get("files", 1) > 1 else ""))
    s = stamp.get("settings")
    if s:
        out.append(f"- settings: device {s.get('device')}, {'full' if s.get('full') else 'small'} sizes, "
                   f"dtype {s.get('amp_dtype') or 'float32'}, timer {_timer_name(s)}, "
                   f"warm-up {s.get('warmup')} (+1 first call), "
                   f"rounds ≥ {s.get('min_rounds')} (≤ {s.get('max_rounds')}, ~{s.get('max_time')} s per benchmark)")
    return out


def _timer_name(s) -> str:
    c = s.get("clock", "wall")
    return {"wall": "wall clock (perf_counter)", "process": "process CPU time (process_time)",
            "cuda_events": "CUDA events"}.get(c, c) + (f", {s['threads']} thread(s)" if s.get("threads") else "")


def summary_table(groups) -> list:
    lines = [("| suite | case | mode | best resfuse | median ms | ×eager | ×eager_cl | ×compile | ×best compile "
              "| peak MiB (eager) |"),
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for rows in groups.values():
        rf = [r for r in rows if str(r["variant"]).startswith("resfuse-")]
        if not rf:
            continue
        b = min(rf, key=lambda r: r["median_ms"])
        lines.append(f"| {b['suite']} | {b['case']} | {b['mode']} | {b['variant']} | {_ms(b['median_ms'])} "
                     f"| {_x(b['x_eager'])} | {_x(b['x_eager_cl'])} | {_x(b['x_compile'])} | {_x(b['x_best_compile'])} "
                     f"| {_f(b['peak_mib'], '{:.1f}')} ({_f(b['eager_peak_mib'], '{:.1f}')}) |")
    return lines


def suite_table(groups, suite) -> list:
    rows = [r for g in groups.values() for r in g if r["suite"] == suite]
    floor = any(r["pct_of_floor"] is not None for r in rows)
    head = "| case | mode | variant | median ms (p20–p80) | img/s | ×eager | ×compile | peak MiB |"
    sep = "|---|---|---|---:|---:|---:|---:|---:|"
    if floor:
        head, sep = head + " % of floor |", sep + "---:|"
    lines = [head, sep]
    last = None
    for r in rows:
        first = r["group"] != last
        last = r["group"]
        flag = " ⚠" if r["rel_err"] is not None and r["rel_err"] > (5e-2 if "autocast" in str(r["extra"].get("dtype")) else 1e-3) else ""
        cells = [r["case"] if first else "", r["mode"] if first else "", f"{r['variant']}{flag}",
                 f"{_ms(r['median_ms'])} ({_ms(r['p20_ms'])}–{_ms(r['p80_ms'])})",
                 _f(r["images_per_s"], "{:.1f}"), _x(r["x_eager"]), _x(r["x_compile"]), _f(r["peak_mib"], "{:.1f}")]
        if floor:
            cells.append(_f(r["pct_of_floor"], "{:.0f}%"))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(groups, stamp, title, note=None) -> str:
    out = [f"# {title}", ""] + stamp_lines(stamp) + [""]
    if note:
        out += [f"> {note}", ""]
    out += [("×X = median of X / median of the row's variant, same case and mode (above 1: faster than X; bold ≥ 1). "
             "Medians of per-round times with the 20th–80th percentiles. "
             "Peak MiB: extra memory one step allocates above what is resident before it (see benchmarks/README.md). "
             "⚠: output differs from eager beyond tolerance."), ""]
    out += ["## Summary: fastest resfuse variant per case", ""] + summary_table(groups) + [""]
    suites = []
    for rows in groups.values():
        for r in rows:
            if r["suite"] not in suites:
                suites.append(r["suite"])
    for suite in suites:
        out += [f"## {suite}", ""] + suite_table(groups, suite) + [""]
    return "\n".join(out)


# -- PNG ----------------------------------------------------------------------------------------------------------
def chart(groups, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    suites = OrderedDict()
    for g, rows in groups.items():
        if any(r["x_eager"] is not None for r in rows):
            suites.setdefault(rows[0]["suite"], []).append((g, rows))
    if not suites:
        raise SystemExit("report.py: no group has an 'eager' variant to chart against")
    variants = sorted({r["variant"] for gs in suites.values() for _, rows in gs for r in rows
                       if r["variant"] != "eager"}, key=_order)  # eager is the line at 1
    cmap = plt.get_cmap("tab10")
    color = {v: cmap(i % 10) for i, v in enumerate(variants)}
    nbars = [sum(len([r for r in rows if r["variant"] != "eager"]) + 1 for _, rows in gs) for gs in suites.values()]
    fig, axes = plt.subplots(1, len(suites), figsize=(5 * len(suites), 0.13 * max(nbars) + 1.6), squeeze=False,
                             layout="constrained")
    xs = [r["x_eager"] for gs in suites.values() for _, rows in gs for r in rows if r["x_eager"]]
    lo, hi = min(xs + [1.0]) / 1.1, max(xs + [1.0]) * 1.1
    fine = (0.5, 0.75, 1, 1.25, 1.5, 2, 3, 4) if hi / lo < 8 else (1 / 32, 1 / 16, 0.125, 0.25, 0.5, 1, 2, 4, 8, 16, 32)
    ticks_x = [t for t in fine if lo <= t <= hi]
    for ax, (suite, gs) in zip(axes[0], suites.items()):
        y, ticks, labels = 0.0, [], []
        for _, rows in gs:
            rows = [r for r in rows if r["variant"] != "eager"]
            for i, r in enumerate(rows):
                if r["x_eager"] is not None:
                    ax.barh(y + i, r["x_eager"], color=color[r["variant"]], height=0.85)
            ticks.append(y + (len(rows) - 1) / 2)
            labels.append(f"{rows[0]['case']} {rows[0]['mode']}" if rows else "")
            y += len(rows) + 1
        ax.set_yticks(ticks, labels, fontsize=7)
        ax.set_ylim(max(nbars) - 0.5, -1)
        ax.set_xscale("log")
        ax.set_xlim(lo, hi)
        ax.set_xticks(ticks_x, [f"{t:g}" for t in ticks_x], fontsize=7)
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_title(suite, fontsize=10, loc="left")
        ax.grid(axis="x", alpha=0.3)
        ax.set_xlabel("speed-up over eager (log scale)", fontsize=8)
    handles = [plt.Rectangle((0, 0), 1, 1, color=color[v]) for v in variants]
    fig.legend(handles, variants, loc="outside lower center", ncol=len(variants), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", nargs="+", help="pytest-benchmark JSON file(s)")
    p.add_argument("--md", help="write the Markdown report here (default: stdout)")
    p.add_argument("--png", help="write the chart here")
    p.add_argument("--title", default=None, help="report title (default: from the device)")
    p.add_argument("--note", default=None, help="a paragraph quoted under the stamp (e.g. how to read this run)")
    args = p.parse_args(argv)
    rows, stamp = load(args.json)
    if not rows:
        print("report.py: no benchmarks with timings in " + ", ".join(args.json), file=sys.stderr)
        return 1
    groups = by_group(rows)
    dev = (stamp.get("settings") or {}).get("device") or ""
    title = args.title or f"resfuse benchmarks: {stamp.get('gpu') or stamp.get('cpu') or dev}"
    md = markdown(groups, stamp, title, args.note)
    if args.md:
        os.makedirs(os.path.dirname(os.path.abspath(args.md)), exist_ok=True)
        with open(args.md, "w") as f:
            f.write(md + "\n")
    else:
        print(md)
    if args.png:
        os.makedirs(os.path.dirname(os.path.abspath(args.png)), exist_ok=True)
        chart(groups, args.png, title)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
