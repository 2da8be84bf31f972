"""Where a Python proxy's CPU goes per request, under a wrk load of small JSON POSTs.

:func:`phase_profile` gives the proxies core 0 to themselves (the upstream moves to the load
core), so a sample of the proxy's thread is the proxy running, not waiting for the upstream.
It reports, per request: CPU time split into user and kernel time (/proc), the system calls
(``strace -c``, when installed), and a py-spy profile (when installed).

py-spy (when installed in the venv or on PATH; it is not a project dependency) attaches to the
running proxy without pausing it (``--nonblocking``), pinned to the load core. Its samples
give *shares* only; the CPU time per request comes from /proc over the same run and is split
by those shares: by the file of the innermost Python frame (self time), and inclusively for
the proxy's own functions. Time in C extensions (uvloop, aiohttp's parsers and writers) is
charged to the Python frame that called them, so the leaf-file split is coarse; the
inclusive figures and the /proc user/kernel split are the firmer ones.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import contestants as cs
import wrk
from procs import LOAD_CPU, Proc, Procs

RATE_HZ = 1000


def py_spy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def profile(proc: Proc, url: str, script: Path, seconds: float, out: Path) -> dict[str, Any]:
    tool = py_spy()
    if tool is None:
        return {"skipped": "py-spy is not installed (pip install py-spy)"}
    folded = out.with_suffix(".folded")
    spy = subprocess.Popen(
        [tool, "record", "-p", str(proc.pid), "-d", f"{seconds + 1:g}", "-r", str(RATE_HZ),
         "-f", "raw", "-o", str(folded), "--nonblocking"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        load = wrk.run_wrk(url, script=script, connections=32, duration_s=seconds,
                           watch={"proxy": proc})
        spy.wait(seconds + 30)
    finally:
        if spy.poll() is None:
            spy.kill()
            spy.wait()
    if not folded.exists():
        return {"skipped": "py-spy wrote no profile (ptrace not permitted?)"}
    cpu_us = load.cpu["proxy"] * 1e6 / load.rps if load.rps else 0.0
    return summarise(folded.read_text(), load.rps, cpu_us)


#: The proxy package as this harness imports it: batchgate runs from the same checkout.
PACKAGE = Path(cs.ROOT, "proxy").as_posix() + "/"


def _path(frame: str) -> str:
    # py-spy raw frames: "function (path/to/file.py:line)"
    start = frame.rfind("(")
    return frame[start + 1 :].rsplit(":", 1)[0] if start >= 0 else frame


def _file(frame: str) -> str:
    """Where a frame's code lives, short but unambiguous: ``proxy/upstream/client.py`` and
    ``proxy/bench/client.py`` are different rooms; libraries as ``aiohttp/web_protocol.py``."""
    path = _path(frame)
    if path.startswith(PACKAGE):
        return "proxy/" + path[len(PACKAGE) :]
    if not path.startswith("/"):  # py-spy's short form is already package-relative
        return path or "?"
    _, marker, inside = path.rpartition("-packages/")
    if marker:
        return inside or "?"
    return path.rsplit("/", 1)[-1] or "?"


def _function(frame: str) -> str:
    start = frame.rfind("(")
    return f"{frame[:start].strip()} ({_file(frame)})" if start >= 0 else frame


def _own(frame: str) -> bool:
    """A frame of the proxy's own code: batchgate's package, or the floor's script."""
    return _file(frame).startswith("proxy/") or _path(frame).endswith("passthrough.py")


def summarise(folded: str, rps: float, cpu_us: float) -> dict[str, Any]:
    by_file: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in folded.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        by_file[_file(frames[-1])] += count
        for function in {_function(f) for f in frames if _own(f)}:
            own[function] += count
    if not total:
        return {"skipped": "no samples"}
    us = cpu_us / total  # one sample's share of a request's CPU time
    return {
        "rps": rps,
        "samples": total,
        "cpu_us_per_request": cpu_us,
        "self_us_by_file": {k: v * us for k, v in by_file.most_common(12)},
        "own_functions_inclusive_us": {k: v * us for k, v in own.most_common(12)},
    }


def syscalls(proc: Proc, url: str, script: Path, seconds: float, out: Path) -> dict[str, Any]:
    """System calls per request, counted by ``strace -c`` (which slows the proxy; only the
    counts are kept, not the times)."""
    tool = shutil.which("strace")
    if tool is None:
        return {"skipped": "strace is not installed"}
    trace = subprocess.Popen([tool, "-c", "-f", "-p", str(proc.pid), "-o", str(out)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)  # attached
        load = wrk.run_wrk(url, script=script, connections=32, duration_s=seconds, watch={})
    finally:
        trace.send_signal(signal.SIGINT)
        try:
            trace.wait(10)
        except subprocess.TimeoutExpired:
            trace.kill()
            trace.wait()
    counts: dict[str, float] = {}
    for line in out.read_text().splitlines() if out.exists() else []:
        parts = line.split()
        if len(parts) >= 5 and parts[3].isdigit() and parts[-1].isidentifier():
            counts[parts[-1]] = int(parts[3]) / max(load.requests, 1)
    top = sorted(counts.items(), key=lambda kv: -kv[1])[:8]
    return {"per_request": dict(top), "requests": load.requests}


def phase_profile(procs: Procs, tmp: Path, script: Path, seconds: float) -> dict[str, Any]:
    upstream = cs.start_upstream(procs, cpu=LOAD_CPU, name="upstream-profile")
    targets = {
        "batchgate": cs.start_batchgate(procs, tmp, upstream.port, cs.RAW, name="batchgate-prof"),
        "passthrough": cs.start_passthrough(procs, upstream.port),
    }
    out: dict[str, Any] = {}
    try:
        for name, target in targets.items():
            assert target.proc is not None
            url = target.url + "/v1/completions"
            wrk.run_wrk(url, script=script, connections=32, duration_s=1.0, watch={})  # warm
            load = wrk.run_wrk(url, script=script, connections=32, duration_s=seconds,
                               watch={"proxy": target.proc})
            per_req = 1e6 / load.rps if load.rps else 0.0
            out[name] = {
                "rps_alone_on_core": load.rps,
                "cpu_us_per_request": load.cpu["proxy"] * per_req,
                "kernel_us_per_request": load.sys_cpu["proxy"] * per_req,
                "syscalls": syscalls(target.proc, url, script, min(seconds, 2.0),
                                     tmp / f"{name}.strace"),
                "py_spy": profile(target.proc, url, script, seconds, tmp / name),
            }
    finally:
        for target in targets.values():
            assert target.proc is not None
            procs.stop(target.proc, grace_s=2.0)
        assert upstream.proc is not None
        procs.stop(upstream.proc)
    return out
