"""From the raw results of a run to the figures P1-P5, the ratios, the targets and one table.

``summarise(results)`` is pure (a dict in, a dict out); ``table(summary)`` renders the table
printed by run.py and embedded in docs/benchmarks.md (see docs.py).
Usage: python bench/report.py bench/results/DATE.json   (prints the table again)
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

PROXIES = ("batchgate", "haproxy", "passthrough")
NAMES = ("direct", *PROXIES)
#: With ``make bench BASELINE=<commit>``: that commit's batchgate, in its own table.
ALL = (*NAMES, "baseline")
FLOOR_MARGIN = 0.8  # batchgate may fall below the floor by at most 20 %
#: Measured on this kind of machine with a 27-line aiohttp passthrough (the issue's figures).
REFERENCE = {
    "json": {"passthrough": (0.17, 0.36), "haproxy": (0.57, 0.85)},
    "sse": {"passthrough": (0.40, 0.57), "haproxy": (0.65, 0.80)},
}


def _get(d: Any, *keys: Any) -> Any:
    for key in keys:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _best_rate(raw: dict[str, Any], tests: tuple[str, ...], name: str) -> dict[str, Any] | None:
    """The test (connection count) at which ``name`` reached its highest median rate."""
    best = None
    for test in tests:
        median = _get(raw, test, name, "median")
        if median and (best is None or median["rps"] > best["rps"]):
            best = {**median, "test": test}
    return best


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    raw = results.get("raw") or {}
    out: dict[str, Any] = {"p1": {}, "p2": {}, "p3": {}, "p5": {}, "targets": []}
    for test in ("p1_c1", "p1_rate1000"):
        direct = _get(raw, test, "direct", "median")
        for name in ALL:
            m = _get(raw, test, name, "median")
            if m and direct:
                out["p1"].setdefault(test, {})[name] = {
                    "p50_us": m["p50_us"], "p99_us": m["p99_us"],
                    "added_p50_us": m["p50_us"] - direct["p50_us"],
                    "added_p99_us": m["p99_us"] - direct["p99_us"],
                }
    for kind, tests in (("json", ("p2_json_c32", "p2_json_c64")), ("sse", ("p2_sse16_c32",))):
        best = {name: _best_rate(raw, tests, name) for name in ALL}
        rps = {name: b["rps"] if b else None for name, b in best.items()}
        if rps["direct"] is None:
            continue
        out["p2"][kind] = {
            "rps": rps,
            "at": {name: b["test"] if b else None for name, b in best.items()},
            "proxy_us_per_req": {n: b["proxy_us_per_req"] for n, b in best.items() if b},
            "loadgen_cpu": {n: b["loadgen_cpu"] for n, b in best.items() if b},
            "vs_direct": {n: _ratio(rps[n], rps["direct"]) for n in PROXIES},
            "batchgate_vs_haproxy": _ratio(rps["batchgate"], rps["haproxy"]),
            "batchgate_vs_floor": _ratio(rps["batchgate"], rps["passthrough"]),
        }
        vs_floor = out["p2"][kind]["batchgate_vs_floor"]
        label = "small JSON" if kind == "json" else "16-event SSE"
        _target(out, f"P2 {label}: batchgate >= 0.8 x floor (not 20 % below the passthrough)",
                vs_floor, vs_floor is not None and vs_floor >= FLOOR_MARGIN, "x floor")
        _target(out, f"P2 {label}: batchgate beats the floor (should)", vs_floor,
                vs_floor is not None and vs_floor >= 1.0, "x floor")
        for name, (lo, hi) in REFERENCE[kind].items():
            ratio = out["p2"][kind]["vs_direct"][name]
            out["p2"][kind].setdefault("reference", {})[name] = {
                "measured": ratio, "reference": [lo, hi],
                "inside": ratio is not None and lo <= ratio <= hi,
            }
    streams = results.get("streams") or {}
    for name in ALL:
        s = streams.get(name)
        if s:
            at_1000 = next((x for x in reversed(s["steps"]) if x["streams"] == 1000), None)
            out["p3"][name] = {
                "sustained": s["sustained"],
                "cpu_pct_per_100": s.get("cpu_pct_per_100"),
                "added_p99_ms_at_1000": at_1000["added_p99_ms"] if at_1000 else None,
                "kib_per_stream": s.get("kib_per_stream"),
                "generator_limited": any(x.get("generator_limited") for x in s["steps"]),
            }
    bg3 = out["p3"].get("batchgate")
    if bg3:
        _target(out, "P3: >= 1,000 streams at 20 events/s, added inter-event p99 <= 5 ms",
                bg3["sustained"], bg3["sustained"] >= 1000, "streams")
    queued = results.get("queued") or {}
    for name in (*PROXIES, "baseline"):
        if name in queued:
            out["p5"][name] = {
                "kib_per_queued": queued[name]["kib_per_request"],
                "held": queued[name]["held"],
                "loaded_rss_mib": queued[name]["loaded_rss_kib"] / 1024,
                "kib_per_stream": _get(out, "p3", name, "kib_per_stream"),
            }
    _versus(out, results)
    p4 = results.get("p4")
    if p4:
        out["p4"] = {k: p4[k] for k in ("direct_tokens_per_s", "batchgate_tokens_per_s", "ratio")}
        _target(out, "P4: tokens/s through batchgate >= 0.99 x direct", p4["ratio"],
                bool(p4["met"]), "x direct")
    adaptive = results.get("adaptive")
    if adaptive:
        _target(out, "Adaptive cap on sim --max-batch 16: cap ~16, engine queue ~0, tokens/s "
                ">= 0.97 x the best fixed cap", adaptive["ratio"], bool(adaptive["met"]),
                "x best fixed")
    seed = results.get("seed")
    if seed:
        out["seed"] = [{k: row[k] for k in row if k != "runs"} for row in seed["rows"]]
        worst = max((abs(row["vs_seed"]) for row in seed["rows"]), default=None)
        _target(out, "Seed table: every total within 5 % of the seed's", worst,
                bool(seed["met"]), "worst deviation")
    budget = (results.get("budget") or {}).get("variants") or {}
    if "preemptions" in budget.get("token_budget", {}):
        count_only = budget.get("count_only", {}).get("preemptions")
        _target(out, "Token budget: no engine preemption with max_tokens_in_flight = the KV "
                f"budget (count-only cap: {_fmt(count_only)})",
                budget["token_budget"]["preemptions"],
                budget["token_budget"]["preemptions"] == 0, "preemptions")
    return out


#: (label, where in the summary, whether lower is better, whether "no worse" is a target,
#: the raw tests whose rounds pair the two, and the figure in each run). Rates and latencies
#: are shown, not targets: on a saturated proxy core a rate is the reciprocal of the CPU per
#: request, which the machine's noise moves far less.
VERSUS: tuple[tuple[str, tuple[str, ...], bool, bool, tuple[str, ...], str], ...] = (
    ("P1 latency c=1 p50 (us)", ("p1", "p1_c1", "{}", "p50_us"), True, False,
     ("p1_c1",), "p50_us"),
    ("P1 latency c=1 p99 (us)", ("p1", "p1_c1", "{}", "p99_us"), True, False,
     ("p1_c1",), "p99_us"),
    ("P2 max req/s, small JSON", ("p2", "json", "rps", "{}"), False, False,
     ("p2_json_c32", "p2_json_c64"), "rps"),
    ("P2 proxy CPU per request, small JSON (us)", ("p2", "json", "proxy_us_per_req", "{}"),
     True, True, ("p2_json_c32", "p2_json_c64"), "proxy_us_per_req"),
    ("P2 max streams/s, SSE-16", ("p2", "sse", "rps", "{}"), False, False,
     ("p2_sse16_c32",), "rps"),
    ("P2 proxy CPU per stream, SSE-16 (us)", ("p2", "sse", "proxy_us_per_req", "{}"),
     True, True, ("p2_sse16_c32",), "proxy_us_per_req"),
    ("P3 streams sustained (20 ev/s, +p99 <= 5 ms)", ("p3", "{}", "sustained"), False, True,
     (), ""),
    ("P3 proxy CPU per 100 streams at the most both sustained (% core)",
     ("p3_common", "{}"), True, True, (), ""),
    ("P5 RSS per queued request (KiB)", ("p5", "{}", "kib_per_queued"), True, True, (), ""),
)


def _paired(raw: dict[str, Any], tests: tuple[str, ...], key: str) -> float | None:
    """The median over rounds of batchgate's figure over the baseline's in the same round
    (the rounds of all five and the pairs' own, bench/phases.py's ``_pair_rounds``): the two
    run next to each other, so the machine's drift over the run cancels out (the ratio of
    two medians would keep it)."""
    ratios: list[float] = []
    for test in tests:
        for runs in ("runs", "pair_runs"):  # the rounds of all five, then the pairs' own
            now = _get(raw, test, "batchgate", runs) or []
            then = _get(raw, test, "baseline", runs) or []
            for a, b in zip(now, then, strict=False):
                if a.get(key) and b.get(key):
                    ratios.append(float(a[key]) / float(b[key]))
    if not ratios:
        return None
    ratios.sort()
    mid = len(ratios) // 2
    return ratios[mid] if len(ratios) % 2 else (ratios[mid - 1] + ratios[mid]) / 2


def _p3_common(streams: dict[str, Any]) -> dict[str, float]:
    """Proxy CPU per 100 streams of batchgate and the baseline at the largest step both
    passed: CPU per stream falls as streams are added (the fixed share spreads), so each at
    its own best step would compare different loads."""
    ok = {name: {s["streams"]: s for s in (streams.get(name) or {}).get("steps", []) if s["ok"]}
          for name in ("batchgate", "baseline")}
    common = set(ok["batchgate"]) & set(ok["baseline"])
    if not common:
        return {}
    n = max(common)
    return {name: ok[name][n]["proxy_cpu"] * 100 * 100 / n for name in ok}


def _versus(out: dict[str, Any], results: dict[str, Any]) -> None:
    """batchgate against the baseline commit's, figure by figure, measured in this run."""
    baseline = results.get("baseline")
    if not baseline:
        return
    rev = baseline["commit"]
    raw = results.get("raw") or {}
    out["p3_common"] = _p3_common(results.get("streams") or {})
    figures = []
    for label, path, lower, targeted, tests, key in VERSUS:
        now = _get(out, *(k.format("batchgate") for k in path))
        then = _get(out, *(k.format("baseline") for k in path))
        if now is None or then is None:
            continue
        paired = _paired(raw, tests, key) if tests else None
        ratio = paired if paired is not None else _ratio(now, then)
        no_worse = ratio is not None and (ratio <= 1.0 if lower else ratio >= 1.0)
        figures.append({"figure": label, "batchgate": now, "baseline": then, "ratio": ratio,
                        "paired": paired is not None, "lower_is_better": lower,
                        "no_worse": no_worse})
        if targeted:
            _target(out, f"No worse than the baseline code ({rev}): {label}", ratio,
                    no_worse, "x baseline")
    out["baseline"] = {"commit": rev, "sha": baseline.get("sha", rev), "figures": figures}


def baseline_rows(summary: dict[str, Any]) -> list[list[str]]:
    """Figure, the baseline commit's batchgate, this tree's, the ratio, and whether it is no
    worse (empty without a baseline in the run)."""
    versus = summary.get("baseline")
    if not versus or not versus["figures"]:
        return []
    table = [["figure", f"baseline {versus['commit']}", "batchgate", "batchgate/baseline",
              "no worse"]]
    for f in versus["figures"]:
        spec = ".1f" if isinstance(f["batchgate"], float) and f["batchgate"] < 100 else ".0f"
        table.append([f["figure"], _fmt(f["baseline"], spec), _fmt(f["batchgate"], spec),
                      _fmt(f["ratio"], ".3f", "x"), "yes" if f["no_worse"] else "**no**"])
    return table


def _target(out: dict[str, Any], what: str, value: Any, met: bool, unit: str) -> None:
    out["targets"].append({"target": what, "value": value, "unit": unit, "met": met})


def _fmt(value: float | None, spec: str = ".0f", suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:{spec}}{suffix}"


def _plus(value: float | None, unit: str) -> str:
    return "-" if value is None else f"{value:+.0f} {unit}"


def rows(summary: dict[str, Any]) -> list[list[str]]:
    """Figure, unit, direct, batchgate, HAProxy, floor, then batchgate against direct,
    HAProxy and the floor (ratios for rates, differences for latencies)."""
    head = ["figure", "direct", "batchgate", "haproxy", "passthrough (floor)",
            "batchgate/direct", "batchgate/haproxy", "batchgate/floor"]
    table = [head]
    labels = {"p1_c1": "P1 latency c=1", "p1_rate1000": "P1 latency @1,000 req/s"}
    for test, label in labels.items():
        p1 = _get(summary, "p1", test) or {}
        for pct in ("p50", "p99"):
            vals = {n: _get(p1, n, f"{pct}_us") for n in NAMES}
            if vals["direct"] is None:
                continue
            bg = vals["batchgate"]
            table.append([
                f"{label} {pct} (us)", *(_fmt(vals[n]) for n in NAMES),
                _plus(_diff(bg, vals["direct"]), "us"), _plus(_diff(bg, vals["haproxy"]), "us"),
                _plus(_diff(bg, vals["passthrough"]), "us"),
            ])
    for kind, label in (("json", "P2 max req/s, small JSON"), ("sse", "P2 max streams/s, SSE-16")):
        p2 = _get(summary, "p2", kind)
        if not p2:
            continue
        rps = p2["rps"]
        table.append([
            label, *(_fmt(rps[n]) for n in NAMES),
            _fmt(p2["vs_direct"]["batchgate"], ".2f", "x"),
            _fmt(p2["batchgate_vs_haproxy"], ".2f", "x"),
            _fmt(p2["batchgate_vs_floor"], ".2f", "x"),
        ])
        cpu = p2["proxy_us_per_req"]
        table.append([
            f"  proxy CPU per {'request' if kind == 'json' else 'stream'} (us)", "-",
            *(_fmt(cpu.get(n)) for n in PROXIES), "",
            _fmt(_ratio(cpu.get("batchgate"), cpu.get("haproxy")), ".2f", "x"),
            _fmt(_ratio(cpu.get("batchgate"), cpu.get("passthrough")), ".2f", "x"),
        ])
    p3 = summary.get("p3") or {}
    if p3:
        sus = {n: _get(p3, n, "sustained") for n in NAMES}
        table.append(["P3 streams sustained (20 ev/s, +p99 <= 5 ms)",
                      *(_fmt(sus[n]) for n in NAMES),
                      _fmt(_ratio(sus["batchgate"], sus["direct"]), ".2f", "x"),
                      _fmt(_ratio(sus["batchgate"], sus["haproxy"]), ".2f", "x"),
                      _fmt(_ratio(sus["batchgate"], sus["passthrough"]), ".2f", "x")])
        cpu = {n: _get(p3, n, "cpu_pct_per_100") for n in PROXIES}
        table.append(["P3 proxy CPU per 100 streams (% core)", "-",
                      *(_fmt(cpu[n], ".1f") for n in PROXIES), "",
                      _fmt(_ratio(cpu["batchgate"], cpu["haproxy"]), ".2f", "x"),
                      _fmt(_ratio(cpu["batchgate"], cpu["passthrough"]), ".2f", "x")])
        add = {n: _get(p3, n, "added_p99_ms_at_1000") for n in NAMES}
        table.append(["P3 added inter-event p99 @1,000 (ms)", *(_fmt(add[n], ".1f") for n in NAMES),
                      "", "", ""])
    p5 = summary.get("p5") or {}
    for key, label in (("kib_per_queued", "P5 RSS per queued request (KiB)"),
                       ("kib_per_stream", "P5 RSS per open stream (KiB)")):
        vals = {n: _get(p5, n, key) for n in PROXIES}
        if any(v is not None for v in vals.values()):
            table.append([label, "-", *(_fmt(vals[n], ".1f") for n in PROXIES), "",
                          _fmt(_ratio(vals["batchgate"], vals["haproxy"]), ".2f", "x"),
                          _fmt(_ratio(vals["batchgate"], vals["passthrough"]), ".2f", "x")])
    p4 = summary.get("p4")
    if p4:
        table.append(["P4 sim tokens/s (32 slots, 200 callers)",
                      _fmt(p4["direct_tokens_per_s"]), _fmt(p4["batchgate_tokens_per_s"]),
                      "-", "-", _fmt(p4["ratio"], ".3f", "x"), "", ""])
    for row in summary.get("seed") or []:
        table.append([f"seed N={row['concurrency']} total ms (seed {row['seed_ms']})",
                      _fmt(row["direct_ms"]), _fmt(row["batchgate_ms"]), "-", "-",
                      _fmt(row["batchgate_ms"] / row["direct_ms"], ".3f", "x"), "",
                      f"vs seed {row['vs_seed'] * 100:+.1f} %"])
    return table


def _diff(a: float | None, b: float | None) -> float | None:
    return a - b if a is not None and b is not None else None


def _grid(grid: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in grid) for i in range(len(grid[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip()
             for row in grid]
    lines.insert(1, "-" * len(lines[0]))
    return lines


def table(summary: dict[str, Any]) -> str:
    lines = _grid(rows(summary))
    versus = baseline_rows(summary)
    if versus:
        lines += ["", *_grid(versus)]
    for t in summary.get("targets", []):
        value = t["value"]
        shown = f"{value:.3f}" if isinstance(value, float) else str(value)
        lines.append(f"{'MET   ' if t['met'] else 'MISSED'} {t['target']}: {shown} {t['unit']}")
    return "\n".join(lines) + "\n"


def main() -> int:
    results = json.loads(Path(sys.argv[1]).read_text())
    sys.stdout.write(table(summarise(results)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
