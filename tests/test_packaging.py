"""fastsfu as a package: the sdist carries its sources (and no generated code), `python -m fastsfu`
runs the command line, and a server without the /demo bundle prints no dead links.

The wheel itself is built, repaired and run from a fresh venv by scripts/wheel_smoke.sh.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import aiohttp

import fastsfu
from fastsfu.server.demo_page import NOT_BUILT

ROOT = Path(__file__).resolve().parent.parent
SECRET = "packaging-test-secret-0123456789abcdefghij"


def _tracked(pattern: str) -> set[str]:
    out = subprocess.run(["git", "ls-files", pattern], cwd=ROOT, capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_sdist_carries_every_source_and_no_generated_code(tmp_path: Path) -> None:
    # --no-isolation: the sdist needs only setuptools (no Cython, no protoc), so this stays fast.
    subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--no-isolation", "--skip-dependency-check"]
        + ["--outdir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    (sdist,) = tmp_path.glob("fastsfu-*.tar.gz")
    assert sdist.name == f"fastsfu-{fastsfu.__version__}.tar.gz"
    with tarfile.open(sdist) as tar:
        top = f"fastsfu-{fastsfu.__version__}/"
        names = {m.name.removeprefix(top) for m in tar.getmembers() if m.isfile()}
        pkg_info = tar.extractfile(top + "PKG-INFO").read().decode()  # type: ignore[union-attr]
    needed = (
        _tracked("src/fastsfu")  # .py, .pyx, .pxd, .pyi, _aead.h, py.typed, static/demo.html
        | _tracked("proto")
        | {"setup.py", "pyproject.toml", "MANIFEST.in", "LICENSE", "README.md", "CHANGELOG.md"}
        | {"fastsfu.example.toml"}
    )
    assert {"src/fastsfu/_rtp.pyx", "src/fastsfu/_csys.pxd", "src/fastsfu/_aead.h"} <= needed
    assert len([n for n in needed if n.endswith(".proto")]) == 3
    assert needed - names == set()
    generated = [n for n in names if n.endswith((".c", ".so")) or n.startswith("src/fastsfu/_proto/")]
    assert generated == []
    assert not any(n.startswith("tests/") for n in names)
    assert f"Version: {fastsfu.__version__}" in pkg_info.splitlines()
    assert "License-File: LICENSE" in pkg_info
    assert "Classifier: Operating System :: POSIX :: Linux" in pkg_info


def test_python_m_fastsfu_is_the_fastsfu_command() -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=60)

    help_ = run("-m", "fastsfu", "--help")
    assert help_.returncode == 0 and help_.stdout.startswith("usage: fastsfu ")
    assert "serve" in help_.stdout and "token" in help_.stdout
    assert help_.stdout == run("-m", "fastsfu.server.cli", "--help").stdout
    version = run("-m", "fastsfu", "--version")
    assert version.returncode == 0 and version.stdout.strip() == f"fastsfu {fastsfu.__version__}"
    bad = run("-m", "fastsfu", "serve", "--speakers", "1000")
    assert bad.returncode == 2 and "--speakers" in bad.stderr


# `fastsfu serve` as installed without the bundle: demo_page.BUNDLE points at a missing file.
NO_BUNDLE = """
import sys
from pathlib import Path
import fastsfu.server.demo_page as demo_page
demo_page.BUNDLE = Path(sys.argv[1])
from fastsfu.server.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_serve_without_the_demo_bundle_says_so_and_prints_no_demo_links(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", NO_BUNDLE, str(tmp_path / "demo.js")]
        + ["serve", "--hrpc-port", "0", "--grpc-port", "0", "--discord-port", "-1", "--duration", "30"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        # hRPC, gRPC, media, the demo line, metrics, then the generated secret's token (the last).
        lines = [proc.stdout.readline().strip() for _ in range(6)]  # type: ignore[union-attr]
        assert lines[3] == f"fastsfu: {NOT_BUILT}" and "web_build.sh" in lines[3]
        base = lines[0].split()[-1].replace("ws://", "http://").split("/protocol.")[0]

        async def get() -> None:
            async with aiohttp.ClientSession() as http:
                async with http.get(base + "/demo/") as page:
                    assert page.status == 503 and NOT_BUILT in await page.text()
                async with http.get(base + "/demo/demo.js") as bundle:
                    assert bundle.status == 404 and NOT_BUILT in await bundle.text()

        asyncio.run(asyncio.wait_for(get(), 20))
        proc.send_signal(signal.SIGTERM)
        rest = proc.stdout.read()  # type: ignore[union-attr]
        assert proc.wait(20) == 0 and rest.splitlines()[-1] == "fastsfu: shutting down"
        # The generated-secret banner still gives a token, but no link to a page that cannot work.
        assert lines[5].startswith("fastsfu: generated token secret; a token for user 1: ")
        assert not [line for line in lines + rest.splitlines() if "/demo/" in line]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_building_elsewhere_than_linux_fails_with_a_clear_message(tmp_path: Path) -> None:
    # setup.py's build_ext as it would run on macOS: it stops before Cython with one plain line.
    fake = "import runpy, sys, setuptools.command.build_ext; sys.platform = 'darwin'; "
    fake += "runpy.run_path('setup.py')"  # (setuptools imported first: on Linux it needs Linux)
    build_ext = ["build_ext", "--build-temp", str(tmp_path), "--build-lib", str(tmp_path)]
    out = subprocess.run(
        [sys.executable, "-c", fake, *build_ext], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 1, out
    assert "fastsfu builds and runs on Linux only" in out.stderr and "(this is darwin)" in out.stderr
    assert "Traceback" not in out.stderr and list(tmp_path.iterdir()) == []
