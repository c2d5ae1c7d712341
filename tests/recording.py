"""A curious GPU server for tests: the real RequestHandler, plus a record of every request.

In process: `Recorder(handler)` in front of a LocalTransport keeps the decoded requests in
memory. As a real process: `python tests/recording.py --model DIR --bind ADDR --out DIR`
serves like `teesplit serve` (CPU, float32) and writes each request it receives to
OUT/NNNNNN.npz (the header as JSON, then the tensors), as it arrives.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from teesplit.protocol import decode


class Recorder:
    """Wraps a RequestHandler: records, then lets the real handler answer."""

    def __init__(self, handler, out_dir: Path | None = None):
        self.handler = handler
        self.out_dir = out_dir
        self.requests: list[tuple[dict[str, Any], list[np.ndarray]]] = []

    def handle(self, frames, peer: bytes | None = None, identity: bytes | None = None) -> list:
        try:
            header, tensors = decode(frames, self.handler.limits)
            record = ({k: header.get(k) for k in ("op", "args", "sid")}, [np.array(t) for t in tensors])
        except Exception:  # a malformed request is still answered (with an error) by the handler
            record = None
        if record is not None:
            if self.out_dir is None:
                self.requests.append(record)
            else:
                n = len(list(self.out_dir.glob("*.npz")))
                arrays = {f"t{i}": t for i, t in enumerate(record[1])}
                np.savez(self.out_dir / f"{n:06d}.npz", header=np.array(json.dumps(record[0])), **arrays)
        return self.handler.handle(frames, peer, identity)

    def __getattr__(self, name: str):  # serve() reads limits, counters and session upkeep
        return getattr(self.handler, name)


def load_recordings(out_dir: Path) -> list[tuple[dict[str, Any], list[np.ndarray]]]:
    out = []
    for f in sorted(Path(out_dir).glob("*.npz")):
        with np.load(f) as z:
            header = json.loads(str(z["header"]))
            out.append((header, [z[f"t{i}"] for i in range(len(z.files) - 1)]))
    return out


def main() -> None:
    from teesplit.gpu.zmq_server import serve
    from teesplit.launch import build_service

    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--bind", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    handler, _ = build_service(Path(args.model), "cpu", "float32", threads=1, progress=False)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    serve(Recorder(handler, Path(args.out)), args.bind)


if __name__ == "__main__":
    main()
