"""In-process transport: the GPU service runs inside the runner's process (`--server local`,
the Intel TDX passthrough deployment where the confidential VM drives the GPU itself).

Messages still go through the wire codec, so validation, byte counts and RPC counts are the
same as over a socket; only the socket is gone. Tensor frames are passed zero-copy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


class LocalTransport:
    address = "local"

    def __init__(self, handle: Callable[[Sequence[Any]], list]):
        self._handle = handle
        self._pending: list[list] = []

    def send(self, frames: list) -> None:
        self._pending.append(self._handle(frames))

    def recv(self, timeout_s: float | None = None) -> list:
        return self._pending.pop(0)

    def close(self) -> None:
        self._pending.clear()
