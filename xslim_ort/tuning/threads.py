"""Run NumPy's BLAS on one thread while tuning.

Tuning makes thousands of small BLAS/LAPACK calls (Hessian sums per batch, solves and
Cholesky factors of a few hundred columns). OpenBLAS hands each to its worker threads,
which spin-wait for work: on a loaded machine every call then waits for a descheduled
worker (a 145x145 solve measured 60 ms instead of 0.1 ms on a shared 2-core box). One
thread is also what ONNX Runtime gets here, and keeps results independent of the core
count. This is what ``threadpoolctl`` does, limited to OpenBLAS (NumPy's wheels), on
Linux; elsewhere it does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator
from pathlib import Path

_SYMBOLS = [
    (f"{p}_get_num_threads{s}", f"{p}_set_num_threads{s}") for p in ("scipy_openblas", "openblas") for s in ("64_", "")
]


def _openblas() -> list[tuple[ctypes._CFuncPtr, ctypes._CFuncPtr]]:
    """(get, set) thread-count functions of every OpenBLAS loaded in this process."""
    maps = Path("/proc/self/maps")
    if not maps.is_file():
        return []
    paths = sorted(
        {
            line.split()[-1]
            for line in maps.read_text().splitlines()
            if "openblas" in line.rsplit("/", 1)[-1].lower() and ".so" in line
        }
    )
    found = []
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for get_name, set_name in _SYMBOLS:
            if hasattr(lib, get_name) and hasattr(lib, set_name):
                found.append((getattr(lib, get_name), getattr(lib, set_name)))
                break
    return found


@contextlib.contextmanager
def single_blas_thread() -> Iterator[None]:
    """Limit OpenBLAS to one thread inside the ``with`` block, then restore its setting."""
    libs = _openblas()
    saved = [get() for get, _ in libs]
    for _, set_threads in libs:
        set_threads(1)
    try:
        yield
    finally:
        for (_, set_threads), n in zip(libs, saved, strict=True):
            set_threads(n)
