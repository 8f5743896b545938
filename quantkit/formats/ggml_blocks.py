"""quantkit's safetensors layout for ggml block weights (``--method kquant``).

Each quantized linear ``<module>`` is stored as one uint8 tensor ``<module>.weight_blocks`` of shape
``[out, row_bytes]``: every row is the row's ggml blocks, byte for byte what llama.cpp stores.
``config.json`` records the block type and float shape of every such weight::

    "quantization_config": {
        "quant_method": "quantkit-ggml", "format_version": 1,
        "weights": {"model.layers.0.self_attn.q_a_proj": {"type": "Q4_K", "shape": [128, 256]}, ...}
    }

Tensors the preset keeps in float stay under their own names in their own dtype.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np
import torch

from quantkit.errors import QuantkitError
from quantkit.formats.clients import LLAMA_CPP, QUANTKIT_LOADER, ClientNote
from quantkit.formats.output import OUTPUT_FORMATS, DirectoryFormat, WrittenWeights, refuse_integer_schemes
from quantkit.kquants import BLOCK_FORMATS, decode
from quantkit.schemes.base import BlockQuantized, Quantized

if TYPE_CHECKING:
    from quantkit.plan import QuantPlan

QUANT_METHOD = "quantkit-ggml"
FORMAT_VERSION = 1
SUFFIX = "weight_blocks"


def encode(module: str, quantized: BlockQuantized) -> dict[str, torch.Tensor]:
    return {f"{module}.{SUFFIX}": torch.from_numpy(np.ascontiguousarray(quantized.data))}


def quantization_config(weights: dict[str, tuple[str, tuple[int, int]]]) -> dict[str, Any]:
    """``config.json``'s quantization_config for block-quantized modules: module -> (ggml type, float shape)."""
    return {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "weights": {module: {"type": type_name, "ggml_type_id": int(gguf.GGMLQuantizationType[type_name]),
                             "shape": list(shape)} for module, (type_name, shape) in sorted(weights.items())},
    }


def is_ggml_blocks(quant_config: dict[str, Any] | None) -> bool:
    return quant_config is not None and quant_config.get("quant_method") == QUANT_METHOD


def decode_weight(module: str, blocks: torch.Tensor, quant_config: dict[str, Any]) -> torch.Tensor:
    """The float32 weight ``[out, in]`` of ``module`` from its stored blocks."""
    if quant_config.get("format_version") != FORMAT_VERSION:
        raise QuantkitError(f"unsupported {QUANT_METHOD} format_version {quant_config.get('format_version')!r}")
    entry = quant_config.get("weights", {}).get(module)
    if entry is None:
        raise QuantkitError(f"{module}.{SUFFIX} has no entry in quantization_config.weights")
    out_features, in_features = entry["shape"]
    fmt = BLOCK_FORMATS.get(entry["type"])
    if tuple(blocks.shape) != (out_features, fmt.row_bytes(in_features)) or blocks.dtype != torch.uint8:
        raise QuantkitError(
            f"{module}.{SUFFIX}: {blocks.dtype} {list(blocks.shape)} does not hold {entry['type']} {entry['shape']}"
        )
    return torch.from_numpy(decode(entry["type"], blocks.numpy(), in_features))


class GgmlBlocksFormat(DirectoryFormat):
    """ggml blocks in safetensors (``<module>.weight_blocks``), which ``quantkit eval`` and the loader read."""

    name = "ggml"

    def check(self, plan: QuantPlan) -> None:
        refuse_integer_schemes(plan, self.name)

    def encode(self, module: str, quantized: Quantized) -> dict[str, torch.Tensor]:
        assert isinstance(quantized, BlockQuantized), "check() admits k-quants and casts only"
        return encode(module, quantized)

    def finish(self, directory: Path, config: dict[str, Any], written: WrittenWeights) -> None:
        if written.blocks:
            config["quantization_config"] = quantization_config(written.blocks)

    def clients(self, plan: QuantPlan) -> list[ClientNote]:
        """quantkit's own layout: only quantkit reads it; llama.cpp reads the same blocks from ``--format gguf``."""
        return [ClientNote(QUANTKIT_LOADER, True),
                ClientNote(LLAMA_CPP, False, "quantkit's own layout: use --format gguf")]


OUTPUT_FORMATS.add(GgmlBlocksFormat.name, GgmlBlocksFormat())
