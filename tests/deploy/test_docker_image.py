"""The image, without a Docker engine: build the wheel from exactly what the Dockerfile copies,
install it into a fresh venv, and run the Dockerfile's own ENTRYPOINT against a config.

What this cannot see (the base image, the layer order) hadolint checks in `make lint`; what it
does see is whether the image would start and serve: a wheel missing a module or a dependency,
an entrypoint that names a wrong command or option, a package that only works from the source
tree.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
CONFIG_IN_IMAGE = "/etc/batchgate/config.yaml"
BOUND_S = 30.0


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        word, _, rest = (pending + line).partition(" ")
        out.append((word.upper(), rest.strip()))
        pending = ""
    return out


def stages() -> list[list[tuple[str, str]]]:
    found: list[list[tuple[str, str]]] = []
    for word, rest in instructions():
        if word == "FROM":
            found.append([])
        found[-1].append((word, rest))
    return found


def entrypoint() -> list[str]:
    final = stages()[-1]
    (args,) = [rest for word, rest in final if word == "ENTRYPOINT"]
    argv = json.loads(args)  # exec form is a JSON array; shell form would not parse
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv)
    return argv


def test_dockerfile_is_multi_stage_non_root_exec_form_on_8080() -> None:
    built = stages()
    assert len(built) >= 2, "multi-stage: the build tools stay out of the runtime image"
    final = built[-1]
    assert entrypoint() == ["batchgate", "serve", "--config", CONFIG_IN_IMAGE]
    assert [rest for word, rest in final if word == "EXPOSE"] == ["8080"]
    users = [rest for word, rest in final if word == "USER"]
    assert users, "the runtime stage must set a USER"
    user = users[-1].split(":")[0]
    assert user not in {"0", "root"}
    # Numeric, so Kubernetes' runAsNonRoot can check it without the image's /etc/passwd.
    assert user.isdigit()
    assert not [w for w, _ in final if w == "CMD"], "a CMD would be appended to the entrypoint"


def copied_sources() -> list[str]:
    """Every path the build stage COPYs from the context (not --from another stage)."""
    sources: list[str] = []
    for word, rest in stages()[0]:
        if word == "COPY" and "--from" not in rest:
            *paths, _dest = shlex.split(rest)
            sources += paths
    return sources


def test_dockerignore_lets_in_what_the_dockerfile_copies() -> None:
    """The context is an allow-list (`*`, then `!path`): each COPY source must be let back in."""
    lines = [
        ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert lines[0] == "*", "start from nothing, so a stray secret or .venv is never sent"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    for source in copied_sources():
        assert source.rstrip("/") in allowed, f"{source} is copied but ignored"
        assert (ROOT / source).exists(), source


@pytest.mark.timeout(300)
def test_the_wheel_in_a_fresh_venv_runs_the_entrypoint(tmp_path: Path) -> None:
    # The build context as Docker would see it: only what the build stage copies.
    context = tmp_path / "context"
    for source in copied_sources():
        src = ROOT / source
        if src.is_dir():
            shutil.copytree(src, context / source,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            (context / source).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, context / source)
    dist = tmp_path / "dist"
    # No build isolation: the build backend comes from the test extras, so this works offline.
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(dist), str(context)],
        check=True, cwd=tmp_path, timeout=120,
    )
    (wheel,) = dist.glob("batchgate-*.whl")

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=60)
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
         "--disable-pip-version-check", str(wheel)],
        check=True, cwd=tmp_path, timeout=180,
    )

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "server": {"host": "127.0.0.1", "port": port},
        "replicas": [{"name": "sim-0", "max_concurrency": 2,
                      "simulated": {"max_batch": 2, "time_scale": 0.01}}],
        "logging": {"format": "text", "level": "info"},
    }))
    argv = [str(config) if a == CONFIG_IN_IMAGE else a for a in entrypoint()]
    argv[0] = str(venv / "bin" / argv[0])
    # Away from the sources: the installed package must be enough.
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV"}}
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # bounded by the test timeout
            if "listening" in line or proc.poll() is not None:
                break
        assert proc.poll() is None, proc.stdout.read()
        deadline = time.monotonic() + BOUND_S
        while True:  # readiness follows the sim replica's first probe
            try:
                with urllib.request.urlopen(base + "/readyz", timeout=BOUND_S) as r:
                    assert r.status == 200
                    break
            except urllib.error.HTTPError as e:
                assert e.code == 503 and time.monotonic() < deadline
                time.sleep(0.05)
        request = urllib.request.Request(
            base + "/v1/completions",
            data=json.dumps({"model": "sim-0", "prompt": "a b c", "max_tokens": 3}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=BOUND_S) as resp:
            answer = json.load(resp)
        assert answer["usage"]["completion_tokens"] == 3
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=BOUND_S)
        assert proc.returncode == 0, rest
        assert "Traceback" not in rest
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
