"""The block-format interface: one ggml block type, its byte layout, its encoder and decoder.

A block format turns rows of float32 weights into rows of packed blocks (``uint8``) exactly as
ggml's ``ggml_quantize_chunk`` does, and back exactly as ``gguf.quants.dequantize`` does. Encoders
work on whole rows because some of ggml's importance-weighted encoders need row statistics (the
mean square of the row); the work inside is vectorised over blocks, never a Python loop per block.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import gguf
import numpy as np

from quantkit.errors import QuantkitError
from quantkit.registry import Registry

QK_K = gguf.QK_K  # weights per k-quant super-block (256)


class BlockFormat(ABC):
    """A registered ggml block type (``Q4_K``, ``Q8_0``, ...); its sizes are ggml's (``gguf.GGML_QUANT_SIZES``)."""

    name: str
    ggml_type: gguf.GGMLQuantizationType

    @property
    def block_size(self) -> int:
        """Weights per block."""
        return gguf.GGML_QUANT_SIZES[self.ggml_type][0]

    @property
    def type_size(self) -> int:
        """Bytes per block."""
        return gguf.GGML_QUANT_SIZES[self.ggml_type][1]

    @property
    def code_bits(self) -> int:
        """Bits of each weight's code (the digit in the name: 4 for Q4_K and Q4_0)."""
        return int(self.name[1])

    @property
    def bits_per_weight(self) -> float:
        return self.type_size * 8 / self.block_size

    def row_bytes(self, n_per_row: int) -> int:
        return n_per_row // self.block_size * self.type_size

    @abstractmethod
    def encode_rows(self, rows: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
        """float32 ``[n_rows, n_per_row]`` -> uint8 ``[n_rows, row_bytes]``, as ggml_quantize_chunk.

        ``importance`` (float32 ``[n_per_row]``, ggml's ``imatrix``) selects ggml's
        importance-weighted encoder; ``None`` its reference encoder.
        """

    @abstractmethod
    def decode_blocks(self, blocks: np.ndarray) -> np.ndarray:
        """uint8 ``[n_blocks, type_size]`` -> float32 ``[n_blocks, block_size]``."""

    def blocks_of(self, rows: np.ndarray) -> np.ndarray:
        """``[n_rows, n_per_row]`` as ``[n_blocks, block_size]`` float32 (row-major order)."""
        return np.ascontiguousarray(rows, dtype=np.float32).reshape(-1, self.block_size)


BLOCK_FORMATS: Registry[BlockFormat] = Registry("ggml block type")

ROWS_PER_CHUNK_WEIGHTS = 1 << 20  # encode about a million weights at a time: bounded temporaries


def check_row_length(fmt: BlockFormat, n_per_row: int, name: str = "tensor") -> None:
    if n_per_row % fmt.block_size:
        raise QuantkitError(
            f"{name}: {fmt.name} needs rows divisible by {fmt.block_size}, got row length {n_per_row}"
        )


def encode(type_name: str, weight: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """Quantize a 2-D float weight ``[rows, n_per_row]`` to ggml blocks: uint8 ``[rows, row_bytes]``."""
    fmt = BLOCK_FORMATS.get(type_name)
    if weight.ndim != 2:
        raise QuantkitError(f"{type_name} encodes 2-D weights, got shape {list(weight.shape)}")
    n_rows, n_per_row = weight.shape
    check_row_length(fmt, n_per_row)
    if importance is not None:
        importance = np.ascontiguousarray(importance, dtype=np.float32)
        if importance.shape != (n_per_row,):
            raise QuantkitError(f"importance has shape {list(importance.shape)}, expected [{n_per_row}]")
    out = np.empty((n_rows, fmt.row_bytes(n_per_row)), dtype=np.uint8)
    step = max(1, ROWS_PER_CHUNK_WEIGHTS // max(n_per_row, 1))
    for start in range(0, n_rows, step):
        rows = np.ascontiguousarray(weight[start : start + step], dtype=np.float32)
        out[start : start + step] = fmt.encode_rows(rows, importance)
    return out


def decode(type_name: str, data: np.ndarray, n_per_row: int) -> np.ndarray:
    """ggml blocks uint8 ``[rows, row_bytes]`` back to float32 ``[rows, n_per_row]``."""
    fmt = BLOCK_FORMATS.get(type_name)
    n_rows = data.shape[0]
    if data.shape[-1] != fmt.row_bytes(n_per_row):
        raise QuantkitError(
            f"{type_name}: {data.shape[-1]} bytes per row do not hold {n_per_row} weights"
        )
    blocks = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, fmt.type_size)
    return fmt.decode_blocks(blocks).reshape(n_rows, n_per_row)
