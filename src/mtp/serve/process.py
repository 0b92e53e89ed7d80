"""``mtp serve`` in a child process on a free loopback port: what ``mtp bench serve`` and the tests drive."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

from mtp.errors import UserError


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerProcess:
    """``mtp serve ARGS --port <free>``; ready when /health answers 200 (``start_timeout`` seconds at most)."""

    def __init__(self, args: list[str], env: dict | None = None, start_timeout: float = 300.0):
        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile(mode="w+")  # stderr, read back at the end (a pipe could fill up)
        cmd = [sys.executable, "-m", "mtp", "serve", *args, "--port", str(self.port)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.log, text=True,
                                     env={**os.environ, **(env or {})})
        deadline = time.monotonic() + start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise UserError(f"mtp serve exited with status {self.proc.returncode}: {self.stderr()[-500:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise UserError(f"mtp serve did not answer /health within {start_timeout:g} s")

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def rss_bytes(self) -> int | None:
        """Resident memory of the server process (Linux), or None."""
        from mtp.io import read_proc_kib

        return read_proc_kib(f"/proc/{self.proc.pid}/status", "VmRSS")

    def stop(self, timeout: float = 60.0) -> tuple[int, str]:
        """SIGTERM, wait (then SIGKILL); returns the exit status and everything the server wrote to stderr."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                raise UserError(f"mtp serve (pid {self.proc.pid}) did not exit 30 s after SIGKILL") from None
        return self.proc.returncode, self.stderr()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
