"""ggml block formats: byte equality with ggml's C encoders, decode equality with gguf, error bounds.

Golden vectors (``tests/golden/kquants.safetensors``) were produced by ggml's C reference (see
``tests/golden/make_kquant_golden.py``); the slow tests compare against a locally built
libggml-base directly on larger random inputs when one is available.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from quantkit.errors import QuantkitError
from quantkit.kquants import BLOCK_FORMATS, decode, encode
from tests.ggml_reference import reference

GOLDEN = Path(__file__).parents[1] / "golden" / "kquants.safetensors"
TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0", "Q5_0", "Q4_1", "Q5_1", "TQ1_0", "TQ2_0")
TERNARY = ("TQ1_0", "TQ2_0")

# Worst |error| of a round trip as a fraction of the block's largest |weight|, for ggml's reference
# and importance-weighted encoders (which trade error on unimportant weights for important ones).
# Measured worst over 480 random 8x1024 matrices (gaussian, uniform, student-t, sparse; 1e-1..1e3):
# ref Q2_K .47 Q3_K .26 Q4_K .10 Q5_K .064 Q6_K .019 Q8_0 .008 Q4_0 .125 Q5_0 .063 Q4_1 .067 Q5_1 .033;
# weighted Q2_K .85 Q3_K .38 Q4_K .17 Q5_K .081 Q6_K .096 Q8_0 .008 Q4_0 .22 Q5_0 .12 Q4_1 .18 Q5_1 .087 ...
# TQ1_0/TQ2_0 (no weighted encoder) by construction: |x| < d/2 becomes 0, the rest +-d, so at most d/2 plus
# the fp16 rounding of d (2^-11 of it).
ERROR_BOUNDS = {
    False: {"Q2_K": 0.75, "Q3_K": 0.40, "Q4_K": 0.20, "Q5_K": 0.10, "Q6_K": 0.04, "Q8_0": 0.01, "Q4_0": 0.13,
            "Q5_0": 0.065, "Q4_1": 0.07, "Q5_1": 0.035, "TQ1_0": 0.501, "TQ2_0": 0.501},
    True: {"Q2_K": 1.0, "Q3_K": 0.60, "Q4_K": 0.30, "Q5_K": 0.15, "Q6_K": 0.15, "Q8_0": 0.01, "Q4_0": 0.35,
           "Q5_0": 0.20, "Q4_1": 0.25, "Q5_1": 0.12, "TQ1_0": 0.501, "TQ2_0": 0.501},
}
# ... plus the fp16 rounding of small scales: the largest |code x sub-block scale| times 2^-24, the
# spacing of fp16 subnormals (a super-block scale below 6e-5 keeps only absolute precision).
LARGEST_MULTIPLIER = {"Q2_K": 3 * 15 + 15, "Q3_K": 4 * 32, "Q4_K": 15 * 63 + 63, "Q5_K": 31 * 63 + 63,
                      "Q6_K": 32 * 128, "Q8_0": 127, "Q4_0": 8, "Q5_0": 16,
                      "Q4_1": 15 + 1, "Q5_1": 31 + 1,  # Q4_1/Q5_1: the code times d, plus the fp16 minimum
                      "TQ1_0": 1, "TQ2_0": 1}


def golden() -> dict[str, np.ndarray]:
    with safe_open(str(GOLDEN), "np") as f:
        return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118


def registered(type_name: str) -> None:
    if type_name not in BLOCK_FORMATS:
        pytest.fail(f"{type_name} is not registered")


@pytest.mark.parametrize("mode", ["ref", "imatrix"])
@pytest.mark.parametrize("type_name", TYPES)
def test_golden_bytes(type_name: str, mode: str) -> None:
    registered(type_name)
    data = golden()
    importance = data["importance"] if mode == "imatrix" else None
    ours = encode(type_name, data["rows"], importance)
    expected = data[f"{type_name}.{mode}"]
    type_size = BLOCK_FORMATS.get(type_name).type_size
    blocks_differ = (ours.reshape(-1, type_size) != expected.reshape(-1, type_size)).any(1)
    assert not blocks_differ.any(), f"{blocks_differ.sum()} of {blocks_differ.size} blocks differ"


@pytest.mark.parametrize("type_name", TYPES)
def test_decode_equals_gguf(type_name: str) -> None:
    registered(type_name)
    data = golden()
    for mode in ("ref", "imatrix"):
        blocks = data[f"{type_name}.{mode}"]
        ours = decode(type_name, blocks, data["rows"].shape[1])
        theirs = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[type_name])
        assert ours.dtype == np.float32 and ours.shape == data["rows"].shape
        np.testing.assert_array_equal(ours.view(np.uint32), theirs.astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("type_name", TYPES)
@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    log_scale=st.floats(-6, 4),
    n_blocks=st.integers(1, 3),
    n_rows=st.integers(1, 3),
    distribution=st.sampled_from(["normal", "uniform", "student_t", "sparse"]),
    weighted=st.booleans(),
)
def test_round_trip_error_bound(
    type_name: str, seed: int, log_scale: float, n_blocks: int, n_rows: int, distribution: str, weighted: bool
) -> None:
    """Every weight comes back within ERROR_BOUNDS x its block's largest |weight| (+ fp16 slack)."""
    registered(type_name)
    fmt = BLOCK_FORMATS.get(type_name)
    rng = np.random.default_rng(seed)
    shape = (n_rows, n_blocks * max(fmt.block_size, 256))
    values = {
        "normal": rng.standard_normal(shape),
        "uniform": rng.uniform(-1, 1, shape),
        "student_t": rng.standard_t(4, shape),
        "sparse": rng.standard_normal(shape) * (rng.random(shape) < 0.1),
    }[distribution]
    x = (values * 10.0**log_scale).astype(np.float32)
    importance = rng.lognormal(0, 1, shape[1]).astype(np.float32) if weighted else None
    data = encode(type_name, x, importance)
    assert data.shape == (n_rows, fmt.row_bytes(shape[1]))
    y = decode(type_name, data, shape[1])
    blocks_x, blocks_err = x.reshape(-1, fmt.block_size), np.abs(y - x).reshape(-1, fmt.block_size)
    amax = np.abs(blocks_x).max(axis=1, keepdims=True)
    bound = ERROR_BOUNDS[weighted][type_name] * amax + LARGEST_MULTIPLIER[type_name] * 2.0**-24
    if type_name in ("Q4_1", "Q5_1"):  # a block minimum beyond fp16's 65504 is stored as -inf, in ggml too
        bound[blocks_x.min(axis=1) < -65504] = np.inf
    if type_name in TERNARY:  # d = amax: beyond fp16's 65504 it is stored as inf, in ggml too
        bound[amax[:, 0] > 65504] = np.inf
    assert np.all(blocks_err <= bound), f"worst error / bound {float((blocks_err / bound).max()):.3f}"


@pytest.mark.parametrize("type_name", TERNARY)
def test_ternary_weights_are_stored_exactly(type_name: str) -> None:
    """BitNet-style rows ({-1, 0, +1} x an fp16-exact scale) decode to themselves, and match ggml's bytes."""
    data = golden()
    rows, expected = data["ternary_rows"], data[f"{type_name}.ternary"]
    ours = encode(type_name, rows)
    np.testing.assert_array_equal(ours, expected)
    np.testing.assert_array_equal(decode(type_name, ours, rows.shape[1]), rows)


def test_zero_rows_decode_to_zero() -> None:
    x = np.zeros((2, 512), dtype=np.float32)
    for type_name in BLOCK_FORMATS:
        assert not decode(type_name, encode(type_name, x), 512).any(), type_name


def test_bad_shapes_are_one_line_errors() -> None:
    with pytest.raises(QuantkitError, match="divisible by 256"):
        encode("Q4_K", np.zeros((2, 128), dtype=np.float32))
    with pytest.raises(QuantkitError, match="2-D"):
        encode("Q8_0", np.zeros(64, dtype=np.float32))
    with pytest.raises(QuantkitError, match="importance"):
        encode("Q8_0", np.zeros((1, 64), dtype=np.float32), np.ones(32, dtype=np.float32))
    with pytest.raises(QuantkitError, match="unknown ggml block type"):
        encode("Q7_K", np.zeros((1, 256), dtype=np.float32))


@pytest.mark.slow
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("type_name", TYPES)
def test_bytes_equal_ggml_on_random_matrices(type_name: str, weighted: bool) -> None:
    """2,048 rows x 1,024 of mixed distributions against a locally built libggml-base."""
    ref = reference()
    if ref is None:
        pytest.skip("no libggml-base built (python -m tests.ggml_reference build, or set QUANTKIT_GGML_LIB)")
    rng = np.random.default_rng(7)
    parts = [rng.standard_normal((512, 1024)) * 0.02, rng.standard_t(3, (512, 1024)),
             rng.uniform(-1, 1, (512, 1024)) * 1e-3, np.where(rng.random((512, 1024)) < 0.05,
                                                          rng.standard_normal((512, 1024)), 0)]
    x = np.concatenate(parts).astype(np.float32)
    importance = rng.lognormal(0, 2, 1024).astype(np.float32) * (rng.random(1024) > 0.05) if weighted else None
    ours, theirs = encode(type_name, x, importance), ref.quantize(type_name, x, importance)
    fmt = BLOCK_FORMATS.get(type_name)
    differ = (ours.reshape(-1, fmt.type_size) != theirs.reshape(-1, fmt.type_size)).any(1)
    assert not differ.any(), f"{differ.sum()} of {differ.size} blocks differ"


def _edge_rows(rng: np.random.Generator, n: int = 1024) -> np.ndarray:
    """Rows of degenerate 32-blocks: zero, signed zeros, constant, huge outliers, denormals, non-finite."""
    x = rng.standard_normal((16, n))
    x[:, :32] = 0.0
    x[:, 32:64] = 0.25
    x[:, 64:96] = -3.0
    x[:, 100], x[:, 200] = 1e30, -1e30  # outliers: float32 overflow in max - min
    x[:, 300:332], x[:, 320] = -0.0, 0.0  # the first of the equal minima is kept, sign included
    x[:, 340:372], x[:, 345] = 0.0, -0.0
    x[:, 400:432] = rng.standard_normal((16, 32)) * 1e-42  # denormal: 1/d overflows
    x[:, 448:480] = np.abs(rng.standard_normal((16, 32))) + 5  # all positive: min > 0
    x[:, 500], x[:, 540], x[:, 580] = np.nan, np.inf, -np.inf
    x[:, 608:640] = np.nan
    x[8:] *= 1e37  # the outliers become float32 infinities
    with np.errstate(over="ignore"):
        return x.astype(np.float32)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("type_name", ["Q4_1", "Q5_1", "Q4_0", "Q5_0", "Q8_0", "TQ1_0", "TQ2_0"])
def test_32_blocks_equal_ggml_on_edge_cases(type_name: str, weighted: bool) -> None:
    """The 32-weight and ternary formats' degenerate blocks against a locally built libggml-base, byte for byte.

    For TQ1_0/TQ2_0 a NaN inside a 256-block restarts ggml's running maximum, so later weights exceed the
    scale and the C's wrapping arithmetic (``xi & 3``, ``uint8_t`` sums) decides the bytes.
    """
    ref = reference()
    if ref is None:
        pytest.skip("no libggml-base built (python -m tests.ggml_reference build, or set QUANTKIT_GGML_LIB)")
    rng = np.random.default_rng(15)
    x = np.concatenate([_edge_rows(rng), (rng.standard_t(2, (48, 1024)) * 0.02).astype(np.float32)])
    importance = rng.lognormal(0, 2, 1024).astype(np.float32) * (rng.random(1024) > 0.1) if weighted else None
    with np.errstate(all="ignore"):
        ours, theirs = encode(type_name, x, importance), ref.quantize(type_name, x, importance)
    fmt = BLOCK_FORMATS.get(type_name)
    differ = (ours.reshape(-1, fmt.type_size) != theirs.reshape(-1, fmt.type_size)).any(1)
    assert not differ.any(), f"{differ.sum()} of {differ.size} blocks differ"
