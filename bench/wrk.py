"""wrk (Debian's 4.1) for raw request rates: one thread on the load core, a Lua script that
sends the request and prints the summary as one JSON line, and the CPU every process spent.

wrk's latency percentiles are corrected for coordinated omission (it adds synthetic samples
for every response slower than the mean interval), so they are kept as information only;
latency figures come from :func:`proxy.bench.probes.latency_c1` and ``batchgate bench``.
"""

from __future__ import annotations

import json
import resource
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from procs import Proc

SMALL_POST = '{"model":"bench","prompt":"hello","max_tokens":1}'

_DONE = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,' ..
    '"write":%d,"status":%d,"timeout":%d,"p50_us":%d,"p99_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(99), latency.mean))
end
"""


def write_scripts(tmp: Path) -> dict[str, Path]:
    """``post``: the small JSON completion request; ``stream``: a POST to the SSE route (work:
    it takes a slot, as a generation does; a GET would take batchgate's slot-free path);
    ``get``: a plain GET."""
    post = tmp / "post.lua"
    post.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = '{SMALL_POST}'\n"
        'wrk.headers["Content-Type"] = "application/json"\n' + _DONE
    )
    stream = tmp / "stream.lua"
    stream.write_text(
        'wrk.method = "POST"\n'
        "wrk.body = '{\"stream\":true}'\n"
        'wrk.headers["Content-Type"] = "application/json"\n' + _DONE
    )
    get = tmp / "get.lua"
    get.write_text(_DONE)
    return {"post": post, "stream": stream, "get": get}


@dataclass
class WrkResult:
    rps: float
    requests: int
    errors: int  # socket errors plus non-2xx/3xx answers
    p50_us: int  # coordinated-omission corrected (see the module docstring)
    p99_us: int
    loadgen_cpu: float  # cores wrk used (1.0: the generator may be the limit)
    cpu: dict[str, float]  # cores each watched process used during the run
    sys_cpu: dict[str, float]  # of which in the kernel (system calls, the loopback TCP stack)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_wrk(
    url: str, *, script: Path, connections: int, duration_s: float, watch: dict[str, Proc]
) -> WrkResult:
    cpu0 = {name: proc.cpu_split() for name, proc in watch.items()}
    children0 = _children_cpu()
    start = time.monotonic()
    out = subprocess.run(
        # wrk takes whole seconds only ("2.5s" is a usage error).
        ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration_s))}s", "--timeout", "5s",
         "-s", str(script), url],
        capture_output=True, text=True, timeout=duration_s + 30, check=False,
    )
    wall = time.monotonic() - start
    loadgen = (_children_cpu() - children0) / wall
    cpu1 = {name: proc.cpu_split() for name, proc in watch.items()}
    cpu = {name: (sum(cpu1[name]) - sum(cpu0[name])) / wall for name in watch}
    sys_cpu = {name: (cpu1[name][1] - cpu0[name][1]) / wall for name in watch}
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("WRK_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no summary for {url}:\n{out.stdout}\n{out.stderr}")
    data = json.loads(line[len("WRK_JSON ") :])
    errors = sum(data[k] for k in ("connect", "read", "write", "status", "timeout"))
    return WrkResult(
        rps=data["requests"] / (data["duration_us"] / 1e6),
        requests=data["requests"],
        errors=errors,
        p50_us=data["p50_us"],
        p99_us=data["p99_us"],
        loadgen_cpu=loadgen,
        cpu=cpu,
        sys_cpu=sys_cpu,
    )
