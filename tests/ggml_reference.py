"""ggml's C reference quantizers through ctypes, for golden vectors, slow tests and benchmarks.

Nothing of ggml is in this repository. ``python -m tests.ggml_reference build`` downloads the
``llama-cpp-python`` source distribution from PyPI (it vendors llama.cpp and ggml), configures it
with CMake (``GGML_NATIVE=OFF``; ggml-base, which holds the quantizers, is built for plain x86-64
without FMA, as in every llama.cpp build) and builds ``libggml-base`` under ``.ggml-ref/`` (ignored
by git). ``QUANTKIT_GGML_LIB`` may point at another ``libggml-base`` instead.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import tarfile
from functools import lru_cache
from pathlib import Path

import gguf
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BUILD_ROOT = ROOT / ".ggml-ref"
SDIST_VERSION = "0.3.36"
LIBRARY = BUILD_ROOT / "build" / "bin" / "libggml-base.so"


def library_path() -> Path | None:
    """The libggml-base to use, or None when none is built."""
    path = Path(os.environ.get("QUANTKIT_GGML_LIB", LIBRARY))
    return path if path.exists() else None


def build(version: str = SDIST_VERSION) -> Path:
    """Download llama-cpp-python's sdist and build libggml-base from its vendored llama.cpp."""
    BUILD_ROOT.mkdir(exist_ok=True)
    archive = BUILD_ROOT / f"llama_cpp_python-{version}.tar.gz"
    if not archive.exists():
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             f"llama-cpp-python=={version}", "-d", str(BUILD_ROOT)],
            check=True,
        )
    source = BUILD_ROOT / f"llama_cpp_python-{version}"
    if not source.exists():
        with tarfile.open(archive) as tar:
            tar.extractall(BUILD_ROOT, filter="data")
    llama_cpp = source / "vendor" / "llama.cpp"
    build_dir = BUILD_ROOT / "build"
    subprocess.run(
        ["cmake", "-S", str(llama_cpp), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
         "-DGGML_NATIVE=OFF", "-DGGML_OPENMP=OFF", "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_BUILD_TESTS=OFF",
         "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_SERVER=OFF",
         "-DLLAMA_CURL=OFF"],
        check=True,
    )
    subprocess.run(["cmake", "--build", str(build_dir), "--target", "ggml-base", "-j"], check=True)
    return LIBRARY


class GgmlReference:
    """``ggml_quantize_chunk`` and the type traits' ``to_float`` of a built libggml-base."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lib = ctypes.CDLL(str(path))
        self.lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        self.lib.ggml_quantize_chunk.argtypes = [
            ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
            ctypes.c_int64, ctypes.c_void_p,
        ]
        self.lib.ggml_row_size.restype = ctypes.c_size_t
        self.lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]

    def quantize(self, type_name: str, rows: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
        """float32 ``[n_rows, n_per_row]`` -> uint8 ``[n_rows, row_bytes]`` via ggml_quantize_chunk."""
        ggml_type = int(gguf.GGMLQuantizationType[type_name])
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        n_rows, n_per_row = rows.shape
        row_size = self.lib.ggml_row_size(ggml_type, n_per_row)
        out = np.zeros((n_rows, row_size), dtype=np.uint8)
        weights = None if importance is None else np.ascontiguousarray(importance, dtype=np.float32)
        written = self.lib.ggml_quantize_chunk(
            ggml_type, rows.ctypes.data, out.ctypes.data, 0, n_rows, n_per_row,
            None if weights is None else weights.ctypes.data,
        )
        assert written == out.nbytes, (written, out.nbytes)
        return out


@lru_cache(maxsize=1)
def reference() -> GgmlReference | None:
    path = library_path()
    return GgmlReference(path) if path else None


if __name__ == "__main__":
    if sys.argv[1:] == ["build"]:
        print(build())
    else:
        sys.exit("usage: python -m tests.ggml_reference build")
