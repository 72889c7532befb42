"""A real all-in-one bus per test (development mode, its own port and data), which a test may kill
(-9) and start again on the same port and data."""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[3]
BIN = os.environ.get("EVENTBUS_BIN", str(ROOT / "target" / "debug" / "eventbus"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Bus:
    def __init__(self, data: str) -> None:
        self.port = free_port()
        self.data = data
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [BIN, "serve", "--dev", "--listen", f"127.0.0.1:{self.port}", "--data", self.data],
            stdout=subprocess.DEVNULL,
            env={**os.environ, "EVENTBUS_LOG": "warn"},
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert self.process.poll() is None, "the bus exited while starting"
            time.sleep(0.05)
        raise TimeoutError("the bus did not answer in 30 s")

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def token(self, **claims: object) -> str:
        """A token from development mode's POST /v1/tokens (any role, no API key)."""
        answer = httpx.post(f"{self.url}/v1/tokens", json=claims, timeout=10)
        answer.raise_for_status()
        return answer.json()["token"]


@pytest.fixture
def bus() -> Iterator[Bus]:
    with tempfile.TemporaryDirectory() as data:
        bus = Bus(data)
        bus.start()
        try:
            yield bus
        finally:
            if bus.process is not None and bus.process.poll() is None:
                bus.kill()
