"""The OpenBLAS thread count behind numpy, as threadpoolctl sets it (no torch here: the
trusted side uses this too).

The bench limits the trusted side's numpy to its --tee-threads; `teesplit serve --threads N`
limits the server's numpy (its CPU attention products) to the same N threads as torch."""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Callable, Iterator
from pathlib import Path

_OPENBLAS_SYMBOLS = (  # (set, get) in numpy's bundled scipy-openblas and in a plain OpenBLAS
    ("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
    ("openblas_set_num_threads64_", "openblas_get_num_threads64_"),
    ("openblas_set_num_threads", "openblas_get_num_threads"),
)


def _openblas() -> tuple[Callable[[int], None], Callable[[], int]] | None:
    """(set, get) of the OpenBLAS this process has loaded, or None."""
    with contextlib.suppress(OSError):
        maps = Path("/proc/self/maps").read_text().splitlines()
        paths = {ln.split()[-1] for ln in maps if "openblas" in ln}
        for path in sorted(paths):
            lib = ctypes.CDLL(path)
            for set_name, get_name in _OPENBLAS_SYMBOLS:
                if hasattr(lib, set_name) and hasattr(lib, get_name):
                    return getattr(lib, set_name), getattr(lib, get_name)
    return None


def set_blas_threads(n: int) -> int | None:
    """Limit numpy's OpenBLAS to n threads for the rest of the process; returns the count in
    force, or None where no OpenBLAS is found or n <= 0 (then nothing changes)."""
    funcs = _openblas()
    if funcs is None or n <= 0:
        return None
    funcs[0](n)
    return n


@contextlib.contextmanager
def blas_threads(n: int) -> Iterator[int | None]:
    """Limit numpy's OpenBLAS to n threads, and restore the old count afterwards. Yields the
    count in force, or None where no OpenBLAS is found (then nothing changes)."""
    funcs = _openblas()
    if funcs is None or n <= 0:
        yield None
        return
    set_threads, get_threads = funcs
    old = get_threads()
    set_threads(n)
    try:
        yield n
    finally:
        set_threads(old)
