"""GGUF block quantization: ggml's k-quants (Q2_K..Q6_K), Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 and ternary TQ1_0/TQ2_0.

Each block format is one module registering a :class:`BlockFormat` in :data:`BLOCK_FORMATS`.
"""

from quantkit.kquants import (
    q2_k,  # noqa: F401  (registers its format)
    q3_k,  # noqa: F401  (registers its format)
    q4_0,  # noqa: F401  (registers its format)
    q4_1,  # noqa: F401  (registers its format)
    q4_k,  # noqa: F401  (registers its format)
    q5_0,  # noqa: F401  (registers its format)
    q5_1,  # noqa: F401  (registers its format)
    q5_k,  # noqa: F401  (registers its format)
    q6_k,  # noqa: F401  (registers its format)
    q8_0,  # noqa: F401  (registers its format)
    tq1_0,  # noqa: F401  (registers its format)
    tq2_0,  # noqa: F401  (registers its format)
)
from quantkit.kquants.base import BLOCK_FORMATS, QK_K, BlockFormat, decode, encode

__all__ = ["BLOCK_FORMATS", "QK_K", "BlockFormat", "decode", "encode"]
