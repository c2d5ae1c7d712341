"""A real `teesplit serve`-like process whose GPU service lies once: for end-to-end tests.

python tests/lying_server.py MODEL_DIR ADDRESS MODE OP NTH
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from liar import LyingHandler  # noqa: E402

from teesplit.gpu.zmq_server import serve  # noqa: E402
from teesplit.launch import build_service  # noqa: E402


def main(argv: list[str]) -> int:
    model_dir, address, mode, op, nth = argv
    handler, _ = build_service(Path(model_dir), "cpu", "float32", threads=1, progress=False)
    LyingHandler(handler, mode, op, int(nth))
    serve(handler, address)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
