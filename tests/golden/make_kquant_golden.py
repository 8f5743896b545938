"""Write tests/golden/kquants.safetensors: ggml's own encodings of fixed inputs, per block type.

Produced with ggml's C reference (``ggml_quantize_chunk`` of libggml-base built from the
llama.cpp vendored in llama-cpp-python's sdist, see ``tests/ggml_reference.py``):

    python -m tests.ggml_reference build
    python -m tests.golden.make_kquant_golden

The file holds the float32 inputs (``rows``), an importance vector (``importance``), and for each
type ``<TYPE>.ref`` (no importance: the ``quantize_row_*_ref`` encoders) and ``<TYPE>.imatrix``
(ggml's importance-weighted encoders). The ternary types also encode ``ternary_rows``, BitNet-style weights
(``{-1, 0, +1}`` times a scale) that they store exactly, as ``<TYPE>.ternary``. Metadata records the source
version and build flags.
"""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from tests.ggml_reference import SDIST_VERSION, reference

TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0", "Q5_0", "Q4_1", "Q5_1", "TQ1_0", "TQ2_0")
TERNARY_TYPES = ("TQ1_0", "TQ2_0")
N_PER_ROW = 768  # three super-blocks, 24 blocks of 32
OUT = Path(__file__).with_name("kquants.safetensors")


def golden_rows(rng: np.random.Generator) -> np.ndarray:
    """Rows that exercise the encoders' corner cases, one kind per row."""
    n = N_PER_ROW
    gaussian = rng.standard_normal(n)
    rows = [
        gaussian * 0.02,  # a typical weight row
        rng.standard_t(3, n) * 0.05,  # heavy tails
        rng.uniform(-1, 1, n),
        np.clip(rng.standard_cauchy(n), -50, 50) * 1e-3,  # rare huge outliers
        np.abs(gaussian) * 0.1,  # all positive
        -np.abs(rng.standard_normal(n)) * 3.0,  # all negative, large
        rng.standard_normal(n) * 1e-9,  # below ggml's GROUP_MAX_EPS
        rng.standard_normal(n) * 1e4,
    ]
    special = rng.standard_normal(n) * 0.1
    special[:32] = 0.0  # an all-zero block
    special[32:64] = 0.25  # a constant block
    special[64:96] = 0.0
    special[70] = -0.7  # a single non-zero
    special[256:512] = 0.0  # an all-zero super-block
    rows.append(special)
    bf16 = (rng.standard_normal(n) * 0.03).astype(np.float32)
    rows.append((bf16.view(np.uint32) & 0xFFFF0000).view(np.float32))  # bf16-representable values
    return np.stack(rows).astype(np.float32)


def golden_importance(rng: np.random.Generator) -> np.ndarray:
    """A calibration-like sum of squares: positive, skewed, a few zeros and an all-zero block."""
    importance = (rng.lognormal(0.0, 1.5, N_PER_ROW) * 10).astype(np.float32)
    importance[rng.choice(N_PER_ROW, 40, replace=False)] = 0.0
    importance[96:128] = 0.0
    return importance


def golden_ternary_rows(rng: np.random.Generator) -> np.ndarray:
    """Rows of ``{-1, 0, +1}`` times one fp16-exact scale per row (one row a scale per 256-block), with an all-zero
    block and a block without zeros: what a ternary-trained model's weights look like."""
    trits = rng.integers(-1, 2, (4, N_PER_ROW)).astype(np.float32)
    trits[0, :256] = 0.0
    trits[1, 256:512] = np.where(trits[1, 256:512] == 0, 1.0, trits[1, 256:512])
    scales = np.array([[0.0234375], [1.5], [3.0517578125e-05], [0.0]], dtype=np.float32)
    rows = trits * scales
    rows[3] = trits[3] * np.repeat(np.array([0.125, 0.0078125, 40.0], dtype=np.float32), 256)
    return rows


def main() -> None:
    ref = reference()
    if ref is None:
        raise SystemExit("no libggml-base: run python -m tests.ggml_reference build")
    rng = np.random.default_rng(20261123)
    rows, importance = golden_rows(rng), golden_importance(rng)
    ternary_rows = golden_ternary_rows(rng)
    tensors = {"rows": rows, "importance": importance, "ternary_rows": ternary_rows}
    for type_name in TYPES:
        tensors[f"{type_name}.ref"] = ref.quantize(type_name, rows)
        tensors[f"{type_name}.imatrix"] = ref.quantize(type_name, rows, importance)
    for type_name in TERNARY_TYPES:
        tensors[f"{type_name}.ternary"] = ref.quantize(type_name, ternary_rows)
    metadata = {
        "source": f"llama-cpp-python {SDIST_VERSION} sdist, vendored ggml, ggml_quantize_chunk",
        "build": "cmake -DGGML_NATIVE=OFF -DCMAKE_BUILD_TYPE=Release, target ggml-base",
        "machine": platform.machine(),
    }
    save_file(tensors, str(OUT), metadata=metadata)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
