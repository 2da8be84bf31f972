"""What the deploy tests check PromQL against: the metrics catalogue, a selector scanner, promtool.

promtool parses an expression but cannot say which series it reads, and a typo in a metric
name, a label name or a label value parses fine and silently draws nothing. So the scanner
here lists every selector (metric name and label matchers) and every grouping label of an
expression, and :func:`problems` compares them with :data:`CATALOGUE`, the series batchgate
exports. The scanner trusts promtool for syntax: it only has to be right on valid PromQL.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: Any value allowed (a replica name, a status code, a version).
ANY = None

_ROUTES = frozenset(
    {"/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/models", "other"}
)
_REPLICA: dict[str, frozenset[str] | None] = {"replica": ANY}


Labels = dict[str, frozenset[str] | None]


def _histogram(name: str, labels: Labels) -> dict[str, Labels]:
    # A classic histogram has no series under its own name: only these three.
    return {
        f"{name}_bucket": {**labels, "le": ANY},
        f"{name}_sum": dict(labels),
        f"{name}_count": dict(labels),
    }


#: Every series batchgate exports (the README's metrics table), with each label's allowed
#: values where the set is closed. `job`, `instance` (and
#: `namespace`) are added by Prometheus (TARGET_LABELS).
CATALOGUE: dict[str, Labels] = {
    # class: scheduling.classes (configurable); model: "" (model-blind), a served model or
    # "other".
    "batchgate_queue_depth": {"class": ANY, "model": ANY},
    "batchgate_queue_capacity": {},
    "batchgate_replica_in_flight": _REPLICA,
    "batchgate_replica_max_concurrency": _REPLICA,
    "batchgate_replica_healthy": _REPLICA,
    "batchgate_replica_state": {
        "replica": ANY, "state": frozenset({"healthy", "unhealthy", "ejected"}),
    },
    "batchgate_replica_ejections_total": _REPLICA,
    "batchgate_requests_total": {"replica": ANY, "route": _ROUTES, "code": ANY, "tenant": ANY},
    "batchgate_rejected_requests_total": {
        "reason": frozenset({"queue_full", "queue_timeout", "deadline_unreachable",
                             "no_healthy_replica", "draining",
                             "overloaded", "model_not_found", "request_too_large",
                             "body_too_large", "bad_request", "unauthorized"}),
    },
    "batchgate_upstream_errors_total": {
        "replica": ANY,
        "kind": frozenset({"connect", "timeout", "reset", "status_5xx", "rejected"}),
    },
    "batchgate_upstream_retries_total": _REPLICA,
    "batchgate_client_disconnects_total": {
        "stage": frozenset({"queued", "waiting_first_byte", "streaming"}),
    },
    **_histogram("batchgate_queue_wait_seconds", {"class": ANY}),
    **_histogram("batchgate_time_to_first_byte_seconds",
                 {"route": _ROUTES, "stream": frozenset({"true", "false"})}),
    **_histogram("batchgate_inter_chunk_seconds", {"route": _ROUTES}),
    **_histogram("batchgate_request_duration_seconds", {"route": _ROUTES}),
    "batchgate_tokens_total": {"replica": ANY, "kind": frozenset({"prompt", "completion"})},
    "batchgate_internal_errors_total": {
        "where": frozenset({"usage", "metrics", "access_log", "health", "discovery",
                            "adaptive"}),
    },
    "batchgate_access_log_dropped_total": {},
    "batchgate_build_info": {"version": ANY},
    "batchgate_config_reloads_total": {"result": frozenset({"success", "failure"})},
    "batchgate_config_last_reload_success_timestamp_seconds": {},
    "batchgate_discovery_errors_total": {"dns": ANY},
    "batchgate_replica_engine_waiting": _REPLICA,
    "batchgate_adaptive_scrape_errors_total": _REPLICA,
    # prometheus-client's process collector (Linux).
    "process_cpu_seconds_total": {},
    "process_virtual_memory_bytes": {},
    "process_resident_memory_bytes": {},
    "process_start_time_seconds": {},
    "process_open_fds": {},
    "process_max_fds": {},
}

#: Labels Prometheus attaches to every scraped series: `job` and `instance` always, `namespace`
#: when it discovers its targets in Kubernetes (the Prometheus Operator's PodMonitor and
#: ServiceMonitor always set it). Dashboard and rules filter and group by `namespace` and `job`
#: together, because one deployment is a job in a namespace.
TARGET_LABELS = frozenset({"job", "instance", "namespace"})


# --- scanning ------------------------------------------------------------------------------

_TOKEN = re.compile(
    r"""
    (?P<space>\s+|\#[^\n]*)
    |(?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
    |(?P<number>(?:0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)[a-zA-Z0-9]*)
    |(?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
    |(?P<op>=~|!~|!=|==|>=|<=|[-+*/%^=<>(){}\[\],@:])
    """,
    re.VERBOSE,
)

_AGGREGATORS = frozenset({"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count",
                          "count_values", "bottomk", "topk", "quantile", "limitk",
                          "limit_ratio"})
_GROUPING = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
_WORDS = frozenset({"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"})


@dataclass(frozen=True)
class Matcher:
    label: str
    op: str
    value: str


@dataclass(frozen=True)
class Selector:
    name: str | None  # None for a bare `{...}` selector
    matchers: tuple[Matcher, ...] = ()


@dataclass
class Scan:
    selectors: list[Selector] = field(default_factory=list)
    grouping: set[str] = field(default_factory=set)


def _tokens(expr: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if m is None:
            raise ValueError(f"cannot scan PromQL at {expr[pos:pos + 20]!r} in {expr!r}")
        kind = m.lastgroup
        assert kind is not None
        if kind != "space":
            out.append((kind, m.group()))
        pos = m.end()
    return out


def _unquote(text: str) -> str:
    if text[0] == '"':
        return str(json.loads(text))
    return text[1:-1]


def scan(expr: str) -> Scan:
    """Every selector and grouping label in a (valid) PromQL expression."""
    toks = _tokens(expr)
    result = Scan()

    def text(i: int) -> str:
        return toks[i][1] if i < len(toks) else ""

    def matchers(i: int) -> tuple[tuple[Matcher, ...], int]:
        # toks[i] is "{"; returns the matchers and the index after "}".
        found: list[Matcher] = []
        i += 1
        while text(i) != "}":
            if text(i) == ",":
                i += 1
                continue
            label, op, value = toks[i][1], text(i + 1), toks[i + 2]
            if value[0] != "string":
                raise ValueError(f"unexpected matcher value {value[1]!r} in {expr!r}")
            found.append(Matcher(label, op, _unquote(value[1])))
            i += 3
        return tuple(found), i + 1

    i = 0
    while i < len(toks):
        kind, word = toks[i]
        if word == "[":  # a range or subquery: durations only
            while text(i) != "]":
                i += 1
        elif word == "{":
            found, i = matchers(i)
            result.selectors.append(Selector(None, found))
            continue
        elif kind == "ident":
            low = word.lower()
            if low in _GROUPING:
                if text(i + 1) == "(":
                    i += 2
                    while text(i) != ")":
                        if text(i) != ",":
                            result.grouping.add(toks[i][1].strip("\"'`"))
                        i += 1
            elif low in _WORDS or text(i + 1) == "(":
                pass  # an operator, a number, or a function or aggregation call
            elif low in _AGGREGATORS and text(i + 1).lower() in ("by", "without"):
                pass  # `sum by (x) (...)`
            else:
                if text(i + 1) == "{":
                    found, i = matchers(i + 1)
                    result.selectors.append(Selector(word, found))
                    continue
                result.selectors.append(Selector(word))
        i += 1
    return result


_LITERAL_ALTERNATION = re.compile(r"[\w/.]+(?:\|[\w/.]+)*")


def problems(expr: str, *, recorded: Iterable[str] = ()) -> list[str]:
    """Why ``expr`` may read series batchgate does not export; empty if it reads only real ones.

    ``recorded`` names series that recording rules produce: allowed too, but their labels are
    not known here, so their matchers and the expression's grouping labels go unchecked.
    """
    recorded = frozenset(recorded)
    found: list[str] = []
    s = scan(expr)
    labels_in_play = set(TARGET_LABELS)
    check_grouping = True
    for sel in s.selectors:
        if sel.name is None:
            found.append(f"selector without a metric name: {sel}")
        elif sel.name in recorded:
            check_grouping = False
        elif sel.name not in CATALOGUE:
            found.append(f"metric {sel.name!r} is not in the catalogue")
        else:
            known = CATALOGUE[sel.name]
            labels_in_play |= set(known)
            for m in sel.matchers:
                if m.label not in known and m.label not in TARGET_LABELS:
                    found.append(f"{sel.name} has no label {m.label!r}")
                else:
                    found += _value_problems(sel.name, m, known.get(m.label))
    if check_grouping:
        found += [f"grouping by {label!r}, which no selected series carries"
                  for label in sorted(s.grouping - labels_in_play)]
    return found


def _value_problems(name: str, m: Matcher, allowed: frozenset[str] | None) -> list[str]:
    if allowed is None:
        return []
    if m.op in ("=", "!="):
        values = [m.value]
    elif _LITERAL_ALTERNATION.fullmatch(m.value):  # "a|b|c": check each literal
        values = m.value.split("|")
    else:
        return []  # a real regular expression: cannot enumerate it
    return [f"{name}{{{m.label}{m.op}...}}: {v!r} is not one of {sorted(allowed)}"
            for v in values if v not in allowed]


# --- promtool ------------------------------------------------------------------------------

def promtool() -> str:
    """The promtool binary; fails (never skips) the calling test when it is missing."""
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool is not installed (not on PATH). These tests need it to check the "
            "Prometheus rules and the dashboard's PromQL: install Debian's `prometheus` "
            "package (apt-get install prometheus) or put the promtool binary of a Prometheus "
            "release on PATH. `make test` installs it.",
            pytrace=False,
        )
    return path


def run_promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *map(str, args)], capture_output=True, text=True, timeout=120, check=False
    )
