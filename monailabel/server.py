"""Start and stop a MONAI Label server with the documented command on 127.0.0.1 and a free port (standard library).

Used by ``bench/monailabel_load.py`` and ``monailabel/render_figure.py``; the end-to-end test has its own copy of
this logic with assertions.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
START = REPO_ROOT / "monailabel" / "start.sh"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(studies: Path, work: Path, env: dict | None = None, timeout: float = 600) -> tuple[subprocess.Popen, str]:
    """Run ``monailabel/start.sh STUDIES PORT`` with its app under ``work``; return the process and its URL.

    The process runs in its own process group (``stop`` ends the group: the server and its training runs).
    """
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    environment = {
        **os.environ,
        "MONAILABEL_APP": str(work / "app"),
        "MONAI_LABEL_SESSION_PATH": str(work / "sessions"),
        "TMPDIR": str(work),
        "PYTHONUNBUFFERED": "1",
        **(env or {}),
    }
    with open(work / "server.log", "w") as log:
        server = subprocess.Popen(
            ["bash", str(START), str(studies), str(port)],
            stdout=log, stderr=subprocess.STDOUT, env=environment, start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited ({server.returncode}); see {work / 'server.log'}")
        try:
            with urllib.request.urlopen(f"{url}/info/", timeout=5):
                return server, url
        except OSError:
            time.sleep(1)
    stop(server)
    raise RuntimeError(f"the server did not answer in {timeout:.0f} s; see {work / 'server.log'}")


def stop(server: subprocess.Popen) -> None:
    """Interrupt the server's process group, then kill what is left of it."""
    for sig, wait in ((signal.SIGINT, 20), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        if server.poll() is not None:
            break
        try:
            os.killpg(server.pid, sig)
            server.wait(timeout=wait)
        except ProcessLookupError:
            break
        except subprocess.TimeoutExpired:
            continue
    try:
        os.killpg(server.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
