"""Directories laid out like the kernel's TEE attestation interfaces, answered by a thread that
plays the kernel, so the API's real file I/O runs against them in any process.

- configfs-tsm: a report entry with `inblob`, `outblob`, `provider` and `generation`.
- Gramine: `user_report_data` and `quote`.

The output file is a FIFO. When a 64-byte report data has been written to the input file,
the "kernel" bumps `generation` (as a write to inblob does), opens the FIFO (which waits for
the reader) and writes the quote `make_quote(report_data)`, then end-of-file, as reading a
configfs attribute does.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path


class FakeTEEDevice:
    def __init__(
        self,
        directory: Path,
        make_quote: Callable[[bytes], bytes],
        *,
        gramine: bool = False,
        provider: str = "tdx_guest",
    ):
        self.dir = directory
        self.make_quote = make_quote
        self.gramine = gramine
        self.inputs: list[bytes] = []  # every report data the API asked a quote for
        self.extra_writers = 0  # > 0: pretend another process wrote inblob, this many times
        directory.mkdir(parents=True, exist_ok=True)
        self.in_path = directory / ("user_report_data" if gramine else "inblob")
        self.out_path = directory / ("quote" if gramine else "outblob")
        self.in_path.write_bytes(b"")
        os.mkfifo(self.out_path)
        if not gramine:
            (directory / "provider").write_text(provider + "\n")
            (directory / "generation").write_text("0\n")
        self._stop = False
        self.thread = threading.Thread(target=self._serve, name="fake-kernel", daemon=True)
        self.thread.start()

    def _bump_generation(self, by: int) -> None:
        gen = self.dir / "generation"
        gen.write_text(f"{int(gen.read_text()) + by}\n")

    def _next_input(self) -> bytes | None:
        """Wait for a complete 64-byte write to the input file, take it and empty the file (file
        times are too coarse to tell two quick writes apart; an empty file is unambiguous)."""
        while not self._stop:
            if self.in_path.stat().st_size == 64:
                data = self.in_path.read_bytes()
                self.in_path.write_bytes(b"")
                return data
            time.sleep(0.001)
        return None

    def _serve(self) -> None:
        while True:
            data = self._next_input()
            if data is None:
                return
            self.inputs.append(data)
            if not self.gramine:
                racing = self.extra_writers > 0
                self.extra_writers -= racing
                self._bump_generation(2 if racing else 1)
            fd = os.open(self.out_path, os.O_WRONLY)  # waits for the reader
            try:
                os.write(fd, self.make_quote(data))
            finally:
                os.close(fd)

    def close(self) -> None:
        self._stop = True
        self.thread.join(5)
