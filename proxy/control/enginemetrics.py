"""Read an engine's own queue and load from its Prometheus ``/metrics`` text.

Whichever engine it is: the series below are looked for by name, the first family found wins
for each quantity (vLLM's ``kv_cache_usage_perc`` before the ``gpu_cache_usage_perc`` of
older versions). Counts are summed over label sets (``model_name``, vLLM's ``engine`` under
data parallelism); KV usage is the largest of them (the fullest engine is the one that
preempts first). NaN samples are skipped.

Only the lines of those series reach the parser, so an engine's hundreds of histogram
buckets cost a string compare each and a body is parsed in well under a millisecond; the
body itself is bounded by the caller (:data:`MAX_BODY_BYTES`).
"""

from __future__ import annotations

import math

from prometheus_client.parser import text_string_to_metric_families

from proxy.core.adaptive import EngineReading

#: The largest ``/metrics`` body read (vLLM's is about 100 KiB with every histogram).
MAX_BODY_BYTES = 4 * 1024 * 1024

#: Requests queued inside the engine, by engine.
WAITING = (
    "vllm:num_requests_waiting",
    "tgi_queue_size",
    "sglang:num_queue_reqs",
    "llamacpp:requests_deferred",
)
#: Requests in the engine's batch.
RUNNING = (
    "vllm:num_requests_running",
    "tgi_batch_current_size",
    "sglang:num_running_reqs",
    "llamacpp:requests_processing",
)
#: KV cache usage as a fraction 0..1 (vLLM's "perc" series are fractions too).
KV_USAGE = (
    "vllm:kv_cache_usage_perc",
    "vllm:gpu_cache_usage_perc",
    "sglang:token_usage",
    "llamacpp:kv_cache_usage_ratio",
)
KNOWN = frozenset(WAITING + RUNNING + KV_USAGE)


class NoKnownSeries(ValueError):
    """The text parsed but holds none of the series above (not an engine we know)."""


def _wanted(line: str) -> bool:
    if line.startswith("#"):
        parts = line.split(None, 3)  # "# TYPE name gauge"
        return len(parts) >= 3 and parts[1] in ("TYPE", "HELP") and parts[2] in KNOWN
    end = len(line)
    for stop in ("{", " ", "\t"):
        at = line.find(stop)
        if at != -1:
            end = min(end, at)
    return line[:end] in KNOWN


def parse(text: str) -> EngineReading:
    """The engine's reading from its ``/metrics`` text.

    Raises ``ValueError`` when a line of a known series does not parse, and
    :class:`NoKnownSeries` when none is there.
    """
    lines = "\n".join(line for line in text.splitlines() if _wanted(line))
    values: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(lines + "\n" if lines else ""):
        for sample in family.samples:
            if sample.name in KNOWN and not math.isnan(sample.value):
                values.setdefault(sample.name, []).append(float(sample.value))
    if not values:
        raise NoKnownSeries("none of the series batchgate reads: " + ", ".join(WAITING))

    def first(names: tuple[str, ...], combine: str) -> float | None:
        for name in names:
            found = values.get(name)
            if found:
                return sum(found) if combine == "sum" else max(found)
        return None

    return EngineReading(
        waiting=first(WAITING, "sum"),
        running=first(RUNNING, "sum"),
        kv_usage=first(KV_USAGE, "max"),
    )
