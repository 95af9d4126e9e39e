"""deploy/: the systemd unit passes `systemd-analyze verify`, the Dockerfile and the unit use only
files of this repository and flags the CLI accepts, CI and the image build and install the wheel
with the same scripts, and the container's health probe against a real `fastsfu serve`."""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_server_edge import serve

from fastsfu.server.cli import parse_args
from fastsfu.server.config import OPTIONS, ServerConfig

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKERFILE = (DEPLOY / "Dockerfile").read_text()
UNIT = (DEPLOY / "fastsfu.service").read_text()
REPO_PATH = re.compile(r"(?<![\w/.-])((?:scripts|deploy)/[\w.-]+|fastsfu\.example\.toml)")


def instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(
        r"\\\n\s*", " ", "\n".join(line for line in dockerfile.splitlines() if not line.startswith("#"))
    )
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip()
    ]


def unit_value(key: str) -> str:
    (value,) = [line.split("=", 1)[1] for line in UNIT.splitlines() if line.startswith(key + "=")]
    return value


def test_the_dockerfile_uses_files_of_the_repository_and_flags_the_cli_accepts() -> None:
    steps = instructions(DOCKERFILE)
    assert [args for kind, args in steps if kind == "FROM"] == [
        "python:3.11-slim-bookworm AS build",
        "python:3.11-slim-bookworm",
    ]
    for kind, args in steps:
        if kind == "COPY" and not args.startswith("--from"):
            *sources, _ = args.split()
            for source in sources:
                assert source == "." or glob.glob(str(ROOT / source)), source
    # Every script a RUN or a comment names is in the repository, and executable.
    named = set(REPO_PATH.findall(DOCKERFILE))
    assert {"scripts/build_wheel.sh", "scripts/web_build.sh", "deploy/install.sh"} <= named
    for path in named:
        assert (ROOT / path).is_file(), path
        assert not path.endswith(".sh") or os.access(ROOT / path, os.X_OK), path
    (entry,) = [args for kind, args in steps if kind == "ENTRYPOINT"]
    argv = json.loads(entry)  # the exec form: a JSON array
    assert argv[0] == "/opt/fastsfu/bin/fastsfu"  # the venv deploy/install.sh makes
    assert parse_args(argv[1:]).opt_listen_ip == "0.0.0.0"
    # The published ports are the defaults, and the fixed media port's variable is an option's.
    env = dict(kv.split("=", 1) for kind, args in steps if kind == "ENV" for kv in args.split())
    media = env.pop("FASTSFU_MEDIA_PORT")
    assert "FASTSFU_MEDIA_PORT" in {o.env for o in OPTIONS}
    (exposed,) = [args.split() for kind, args in steps if kind == "EXPOSE"]
    d = ServerConfig()
    assert exposed == [f"{d.hrpc_port}/tcp", f"{d.grpc_port}/tcp", f"{d.discord.port}/tcp", f"{media}/udp"]
    assert [args for kind, args in steps if kind == "STOPSIGNAL"] == ["SIGTERM"]
    assert any(kind == "USER" and args != "root" for kind, args in steps)
    (health,) = [args for kind, args in steps if kind == "HEALTHCHECK"]
    assert "/opt/fastsfu-deploy/healthcheck.py" in health


def test_ci_and_the_image_build_and_install_the_wheel_with_the_same_scripts() -> None:
    smoke = (ROOT / "scripts" / "wheel_smoke.sh").read_text()
    for script in ("scripts/build_wheel.sh", "deploy/install.sh"):
        assert script in smoke and script in DOCKERFILE
    build = (ROOT / "scripts" / "build_wheel.sh").read_text()
    assert "-m build" in build and "auditwheel repair" in build
    install = (DEPLOY / "install.sh").read_text()
    assert '-m venv "$prefix"' in install and 'pip" install' in install
    for script in ("scripts/build_wheel.sh", "deploy/install.sh", "scripts/wheel_smoke.sh"):
        subprocess.run(["bash", "-n", str(ROOT / script)], check=True, timeout=10)  # parses


def test_the_unit_runs_the_installed_server_with_a_credential_and_hardening() -> None:
    argv = shlex.split(unit_value("ExecStart"))
    assert argv[0] == "/opt/fastsfu/bin/fastsfu"
    args = parse_args(argv[1:])
    assert args.config == "/etc/fastsfu/fastsfu.toml"
    assert args.opt_token_secret_file == "${CREDENTIALS_DIRECTORY}/token-secret"
    assert unit_value("LoadCredential") == "token-secret:/etc/fastsfu/token-secret"
    settings = {
        "DynamicUser": "yes",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "PrivateTmp": "yes",
        "CapabilityBoundingSet": "",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX AF_NETLINK",
        "LimitNOFILE": "65536",
        "Restart": "on-failure",
    }
    assert {key: unit_value(key) for key in settings} == settings
    # The stop timeout covers the shutdown: the grace, the final second, a margin; not much more.
    stop = float(unit_value("TimeoutStopSec").removesuffix("s"))
    assert ServerConfig().shutdown_grace + 1 < stop <= ServerConfig().shutdown_grace + 5
    for path in REPO_PATH.findall(UNIT):
        assert (ROOT / path).is_file(), path


def test_systemd_analyze_verify_passes(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed on this machine: the unit's syntax is unchecked")
    # verify also wants ExecStart's program to exist: the console script of this environment stands
    # in for /opt/fastsfu/bin/fastsfu (deploy/install.sh makes that one); every other line is as shipped.
    installed = Path(sys.executable).parent / "fastsfu"
    assert installed.is_file(), "the fastsfu console script next to this Python"
    unit = tmp_path / "fastsfu.service"
    unit.write_text(UNIT.replace("/opt/fastsfu/bin/fastsfu", str(installed)))
    out = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    # It exits 0 on unknown keys and bad values too, warning about them: no output is the pass.
    assert (out.returncode, out.stdout + out.stderr) == (0, "")


@pytest.mark.loopback
@pytest.mark.timeout(60)
def test_the_container_health_probe_against_a_real_server(tmp_path: Path) -> None:
    probe = [sys.executable, str(DEPLOY / "healthcheck.py")]
    with serve(tmp_path, {}) as server:
        port = server.grpc.rsplit(":", 1)[1]
        env = {**os.environ, "FASTSFU_GRPC_PORT": port}  # the image's way to name the port
        ok = subprocess.run(probe, capture_output=True, text=True, timeout=30, env=env)
        assert (ok.returncode, ok.stdout.strip()) == (0, f"fastsfu health: 127.0.0.1:{port}: SERVING")
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(15) == 0
    down = subprocess.run([*probe, f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=30)
    assert down.returncode == 1 and "UNAVAILABLE" in down.stderr
