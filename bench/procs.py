"""Processes for the benchmark: start pinned to a core, read their CPU and memory, stop them.

Every process is started in its own session (so its process group can be signalled without
touching anything else) and registered in a :class:`Procs`, whose ``close()`` (called from
``finally`` in run.py) sends SIGTERM to each group it started, then SIGKILL after a grace
period. Nothing here kills by name.

Pinning is ``sched_setaffinity`` in the child before ``exec``: the same system call as
``taskset -c``. On a machine with fewer than two cores nothing is pinned, and the results say so.
"""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

#: Core of the system under test (upstream + proxy) and of the load generator.
SUT_CPU = 0
LOAD_CPU = 1
#: Sockets a process may hold: 10,000 queued callers need 10,000 on each side and more.
NOFILE = 65536
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


#: The cores this process could use when it started, before pin_self() narrowed them.
_START_AFFINITY = frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None


def can_pin() -> bool:
    return _START_AFFINITY is not None and {SUT_CPU, LOAD_CPU} <= _START_AFFINITY


def raise_nofile(wanted: int = NOFILE) -> int:
    """Raise this process's open-file limit as far as allowed; returns the soft limit."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for limits in ((wanted, max(hard, wanted)), (min(wanted, hard), hard)):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, limits)
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def fd_hard_limit() -> int:
    """The most sockets a child can have (without CAP_SYS_RESOURCE the hard limit stays)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return NOFILE if hard == resource.RLIM_INFINITY else min(max(hard, 1024), 1 << 20)


def pin_self(cpu: int) -> None:
    if can_pin():
        os.sched_setaffinity(0, {cpu})


def _child_setup(cpu: int | None) -> Callable[[], None]:
    def setup() -> None:
        raise_nofile()
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})

    return setup


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def cpu_s(self) -> float:
        """utime + stime of the process so far, in seconds (from /proc/<pid>/stat)."""
        return cpu_seconds(self.pid)

    def cpu_split(self) -> tuple[float, float]:
        """(utime, stime) so far, in seconds: Python and C in user space vs the kernel."""
        return cpu_user_system(self.pid)

    def rss_kib(self) -> int:
        return rss_kib(self.pid)

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def cpu_user_system(pid: int) -> tuple[float, float]:
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    # Field 2 (comm) may hold spaces: split after its closing parenthesis.
    rest = stat[stat.rindex(")") + 2 :].split()
    return int(rest[11]) / CLK_TCK, int(rest[12]) / CLK_TCK


def cpu_seconds(pid: int) -> float:
    user, system = cpu_user_system(pid)
    return user + system


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE_KIB


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


@dataclass
class Procs:
    """The processes this run started; ``close()`` stops every one of them, and only them."""

    log_dir: Path
    pinned: bool = field(default_factory=can_pin)
    started: list[Proc] = field(default_factory=list)

    def start(self, name: str, argv: Sequence[str], *, cpu: int | None = SUT_CPU) -> Proc:
        """Start ``argv`` in a new session, pinned to ``cpu``, output to <log_dir>/<name>.log."""
        log = self.log_dir / f"{name}.log"
        with log.open("ab") as out:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_child_setup(cpu if self.pinned else None),
            )
        proc = Proc(name, popen, log)
        self.started.append(proc)
        return proc

    def stop(self, proc: Proc, grace_s: float = 5.0) -> None:
        if proc.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.popen.wait(grace_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.popen.wait(5)
        if proc in self.started:
            self.started.remove(proc)

    def close(self) -> None:
        for proc in reversed(list(self.started)):
            self.stop(proc)


def wait_http(url: str, proc: Proc, timeout_s: float = 20.0) -> None:
    """Poll ``url`` until it answers 2xx; raise with the process's log if it never does."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited ({proc.popen.returncode}):\n{proc.tail()}")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if 200 <= resp.status < 300:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{proc.name} did not answer {url} in {timeout_s:g}s:\n{proc.tail()}")


def ensure_tools() -> None:
    """wrk and HAProxy from Debian: install when missing (as root), update the index only if
    the first attempt fails."""
    if shutil.which("wrk") and shutil.which("haproxy"):
        return
    cmd = ["apt-get", "install", "-y", "-q", "wrk", "haproxy"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(cmd, env=env, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, check=True)
        subprocess.run(cmd, env=env, check=True)


def _first_line(argv: Sequence[str]) -> str:
    try:
        out = subprocess.run(list(argv), capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def machine_info() -> dict[str, object]:
    import aiohttp
    import uvloop

    from proxy import __version__

    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    commit = _first_line(["git", "-C", str(Path(__file__).parent), "rev-parse", "--short", "HEAD"])
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "aiohttp": aiohttp.__version__,
        "uvloop": getattr(uvloop, "__version__", "unknown"),
        "batchgate": __version__,
        "commit": commit,
        "haproxy": _first_line(["haproxy", "-v"]),
        "wrk": _first_line(["wrk", "-v"]),
        "pinned": can_pin(),
        "loadavg_start": os.getloadavg()[0],
    }
