"""LAPACK's dsyevr (the top eigenpairs of a symmetric matrix, only those) without holding the interpreter lock.

SciPy's `eigh(..., subset_by_index=..., driver="evr")` calls the same routine but holds Python's interpreter lock
for the whole call, so matrices merged in parallel threads queued behind each other there (2 threads doing twice
the work took 2× the time). This calls the routine SciPy exports for compiled code (scipy.linalg.cython_lapack)
through ctypes, which lets go of the lock during foreign calls, with the arguments SciPy's `eigh` passes: the same
LAPACK, the same workspace sizes (asked of the routine), the same bytes (tests/test_linalg_fast_paths.py).
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any

import numpy as np

_ARGS = 21  # dsyevr's arguments, every one a pointer


@functools.cache
def _dsyevr() -> Any:
    """The routine SciPy exports (None without SciPy)."""
    try:
        from scipy.linalg import cython_lapack
    except ImportError:
        return None
    capsule = cython_lapack.__pyx_capi__["dsyevr"]  # type: ignore[attr-defined]
    api = ctypes.pythonapi
    api.PyCapsule_GetName.restype = ctypes.c_char_p
    api.PyCapsule_GetName.argtypes = [ctypes.py_object]
    api.PyCapsule_GetPointer.restype = ctypes.c_void_p
    api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
    address = api.PyCapsule_GetPointer(capsule, api.PyCapsule_GetName(capsule))
    return ctypes.CFUNCTYPE(None, *[ctypes.c_void_p] * _ARGS)(address)  # CFUNCTYPE: the lock is released


def available() -> bool:
    return _dsyevr() is not None


def _ref(x: Any) -> ctypes.c_void_p:
    if isinstance(x, np.ndarray):
        return ctypes.c_void_p(x.ctypes.data)
    return ctypes.cast(ctypes.pointer(x), ctypes.c_void_p)


def top_eigenpairs(a: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The k largest eigenvalues (ascending) and their eigenvectors (columns) of the symmetric fp64 matrix `a`,
    from its lower triangle, as SciPy's `eigh(a, subset_by_index=[n - k, n - 1], driver="evr")` returns them;
    None when LAPACK reports a failure. `a` is not changed."""
    routine = _dsyevr()
    n = a.shape[0]
    c_int, c_double = ctypes.c_int, ctypes.c_double
    jobz, which, uplo = ctypes.c_char(b"V"), ctypes.c_char(b"I"), ctypes.c_char(b"L")
    order, low, high, bounds, tolerance = c_int(n), c_int(n - k + 1), c_int(n), c_double(0.0), c_double(0.0)
    found, info = c_int(0), c_int(0)
    matrix = np.array(a, dtype=np.float64, order="F")  # dsyevr overwrites it
    values, vectors = np.empty(n), np.empty((n, k), order="F")
    support = np.empty(2 * max(k, 1), dtype=np.intc)

    def call(work: np.ndarray, lwork: int, iwork: np.ndarray, liwork: int) -> None:
        routine(*map(_ref, (jobz, which, uplo, order, matrix, order, bounds, bounds, low, high, tolerance, found,
                            values, vectors, order, support, work, c_int(lwork), iwork, c_int(liwork), info)))

    work_size, iwork_size = np.empty(1), np.empty(1, dtype=np.intc)
    call(work_size, -1, iwork_size, -1)  # a workspace query, as SciPy makes one: it changes nothing
    call(np.empty(int(work_size[0])), int(work_size[0]), np.empty(int(iwork_size[0]), dtype=np.intc),
         int(iwork_size[0]))
    if info.value != 0 or found.value != k:
        return None
    return values[:k], vectors
