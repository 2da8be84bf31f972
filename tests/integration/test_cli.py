"""The command line as an operator meets it: real processes, exit codes, stdout and stderr.

A bad config must stop ``serve`` and ``check-config`` alike with exit code 2 and one line on
stderr that names the key and the bad value: no traceback, nothing else to scroll through.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BOUND_S = 20.0
CONSOLE_SCRIPT = Path(sys.executable).parent / "batchgate"

GOOD = """\
replicas:
  - name: a
    url: http://127.0.0.1:9000
    max_concurrency: 2
"""


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        capture_output=True, text=True, timeout=BOUND_S, cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize(
    "entry",
    [
        pytest.param([sys.executable, "-m", "proxy"], id="python-m-proxy"),
        pytest.param(
            [str(CONSOLE_SCRIPT)], id="batchgate",
            marks=pytest.mark.skipif(not CONSOLE_SCRIPT.exists(),
                                     reason="batchgate console script not installed"),
        ),
    ],
)
def test_help_lists_commands(entry: list[str]) -> None:
    done = subprocess.run([*entry, "--help"], capture_output=True, text=True,
                          timeout=BOUND_S, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert "serve" in done.stdout
    assert "check-config" in done.stdout


def test_check_config_prints_the_effective_config(tmp_path: Path) -> None:
    path = tmp_path / "good.yaml"
    path.write_text(GOOD.replace("http://127.0.0.1:9000", "${REPLICA_URL}"))
    done = run("check-config", "--config", str(path), env={"REPLICA_URL": "http://10.0.0.5:8000/"})
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    effective = yaml.safe_load(done.stdout)
    # Placeholders expanded, the URL normalised, every default filled in.
    assert effective["replicas"] == [
        {"name": "a", "max_concurrency": 2, "url": "http://10.0.0.5:8000"}
    ]
    assert effective["queue"]["max_size"] == 1000
    assert effective["server"]["port"] == 8080
    assert effective["server"]["drain_timeout_s"] == 30.0
    assert effective["logging"] == {"format": "json", "level": "info"}

    # What it prints is itself a valid config that means the same.
    again = tmp_path / "effective.yaml"
    again.write_text(done.stdout)
    repeat = run("check-config", "--config", str(again))
    assert (repeat.returncode, repeat.stdout) == (0, done.stdout)


def _with(extra: str) -> str:
    return GOOD + extra


# (id, file text or None for a missing file, the message after "<path>: "; a trailing "..."
# means only the start is fixed, e.g. where PyYAML words the problem).
BAD_CONFIGS = [
    ("missing-file", None, "cannot read config file: No such file or directory"),
    ("invalid-yaml", "replicas: [\n  {name: a\n",
     "invalid YAML at line 3, column 1: expected ',' or '}', but got '<stream end>'..."),
    ("not-a-mapping", "- just\n- a list\n", "top level must be a mapping, got ['just', 'a list']"),
    ("unknown-key", _with("queue:\n  max_sise: 3\n"),
     "queue.max_sise: unknown key (allowed: max_size, timeout_s, max_bytes, sse_heartbeat_s)"),
    ("missing-replicas", "server:\n  port: 8080\n", "replicas: required key is missing"),
    ("negative-concurrency", GOOD.replace("max_concurrency: 2", "max_concurrency: -3"),
     "replicas[0].max_concurrency: must be an integer >= 1, got -3"),
    ("string-for-number", _with("queue:\n  timeout_s: soon\n"),
     "queue.timeout_s: must be a number > 0, got 'soon'"),
    ("bool-for-port", _with("server:\n  port: yes\n"),
     "server.port: must be an integer between 0 and 65535, got True"),
    ("duplicate-name", GOOD + GOOD.removeprefix("replicas:\n"),
     "replicas[1].name: duplicate replica name, got 'a'"),
    ("malformed-url", GOOD.replace("http://127.0.0.1:9000", "ftp//nohost"),
     "replicas[0].url: must be an http:// or https:// URL with a host, "
     "e.g. http://10.0.0.5:8000, got 'ftp//nohost'"),
    ("url-with-credentials", GOOD.replace("http://", "http://user:secret@"),
     "replicas[0].url: must not contain credentials (user:password@)"),
    ("unset-env-var", GOOD.replace("http://127.0.0.1:9000", "${BATCHGATE_TEST_UNSET}"),
     "replicas[0].url: environment variable BATCHGATE_TEST_UNSET is not set"),
    ("url-with-path", GOOD.replace("http://127.0.0.1:9000", "https://127.0.0.1:9443/v1"),
     "replicas[0].url: must not have a path (the caller's path is forwarded as is), "
     "got 'https://127.0.0.1:9443/v1'"),
    ("missing-ca-file", _with("upstream:\n  tls:\n    ca_file: /nonexistent/ca.pem\n"),
     "upstream.tls.ca_file: cannot read CA file: No such file or directory, "
     "got '/nonexistent/ca.pem'"),
]


@pytest.mark.parametrize("command", ["serve", "check-config"])
@pytest.mark.parametrize(
    ("text", "message"), [pytest.param(t, m, id=i) for i, t, m in BAD_CONFIGS]
)
def test_bad_config_is_one_line_and_exit_2(
    tmp_path: Path, command: str, text: str | None, message: str
) -> None:
    path = tmp_path / "batchgate.yaml"
    if text is not None:
        path.write_text(text)
    env = dict(os.environ)
    env.pop("BATCHGATE_TEST_UNSET", None)
    done = subprocess.run(
        [sys.executable, "-m", "proxy", command, "--config", str(path)],
        capture_output=True, text=True, timeout=BOUND_S, cwd=ROOT, env=env,
    )
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stdout == ""
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), done.stderr
    assert done.stderr.endswith("\n")
    # The program's name, the file as given, then the key path and the bad value.
    expected = f"{path}: {message}"
    if message.endswith("..."):
        assert lines[0].startswith(expected.removesuffix("...")), lines[0]
    else:
        assert lines[0] == expected


def test_check_config_accepts_an_https_replica_and_the_tls_keys(tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca_file = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(ca_file))
    path = tmp_path / "tls.yaml"
    path.write_text(GOOD.replace("http://127.0.0.1:9000", "https://vllm.internal:8443/")
                    + f"upstream:\n  tls:\n    ca_file: {ca_file}\n")
    done = run("check-config", "--config", str(path))
    assert done.returncode == 0, done.stderr
    effective = yaml.safe_load(done.stdout)
    assert effective["replicas"][0]["url"] == "https://vllm.internal:8443"
    assert effective["upstream"]["tls"] == {"ca_file": str(ca_file),
                                            "insecure_skip_verify": False}


def test_serve_with_an_https_replica_starts_and_stops(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    path = tmp_path / "config.yaml"
    path.write_text(
        f"server: {{host: 127.0.0.1, port: {port}, drain_quiet_s: 0}}\n"
        "replicas: [{name: r, url: 'https://127.0.0.1:9', max_concurrency: 1}]\n"
        "logging: {format: text, level: info}\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "serve", "--config", str(path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        seen = []
        for line in proc.stdout:  # bounded by the test timeout
            seen.append(line)
            if "listening" in line or proc.poll() is not None:
                break
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=BOUND_S) as r:
            assert r.status == 200
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=BOUND_S)
        assert proc.returncode == 0
        assert "Traceback" not in "".join(seen) + rest
    finally:
        proc.kill()
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


def test_port_in_use_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = tmp_path / "config.yaml"
        path.write_text(
            f"server: {{host: 127.0.0.1, port: {port}}}\n"
            "replicas: [{name: r, url: 'http://127.0.0.1:9', max_concurrency: 1}]\n"
            "logging: {format: text, level: error}\n"
        )
        done = run("serve", "--config", str(path))
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"cannot listen on 127.0.0.1:{port} (server.host, server.port):")


def test_sim_command_serves_and_stops_on_sigterm() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "sim", "--port", str(port), "--max-batch", "2",
         "--time-scale", "0.01"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # bounded by the test timeout
            if "sim engine serving on" in line:
                break
        body = json.dumps({"prompt": "a b c", "max_tokens": 3}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions", data=body,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=BOUND_S) as resp:
            answer = json.load(resp)
        assert answer["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=BOUND_S) == 0
    finally:
        proc.kill()
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


def test_serve_raises_the_soft_open_files_limit_to_the_hard_one(tmp_path: Path) -> None:
    """At a soft limit of 1,024 a busy proxy runs out of descriptors long before the machine."""
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip(f"hard RLIMIT_NOFILE is {hard}: nothing to raise")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "server": {"host": "127.0.0.1", "port": 0, "drain_quiet_s": 0},
        "replicas": [{"name": "r", "url": "http://127.0.0.1:9", "max_concurrency": 1}],
        "health": {"interval_s": 60},
        "logging": {"format": "text"},
    }))

    def low_soft_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "serve", "--config", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=low_soft_limit,
    )
    try:
        assert proc.stdout is not None
        seen: list[bytes] = []
        for line in proc.stdout:  # bounded by the test timeout; serve logs then listens
            seen.append(line)
            if b"batchgate listening on" in line:
                break
        log = b"".join(seen).decode()
        shown = "unlimited" if hard == resource.RLIM_INFINITY else str(hard)
        assert "open files limit: soft 256 -> " in log, log
        assert f"(hard {shown})" in log, log
        limits = Path(f"/proc/{proc.pid}/limits").read_text()
        row = next(line for line in limits.splitlines() if line.startswith("Max open files"))
        soft_now = row.split()[3]
        assert soft_now == (str(hard) if hard != resource.RLIM_INFINITY else str(1 << 20)), row
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()
