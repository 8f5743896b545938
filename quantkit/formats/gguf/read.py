"""A GGUF's tensors as a Hugging Face checkpoint's: :mod:`.layout` read backwards.

Every tensor is dequantized to float32 with ``gguf.quants.dequantize`` (the gguf package's reference
decoder of every ggml block type). Its place comes from the export's own naming run forwards over the
names of the model the rebuilt config describes (:func:`quantkit.model.gguf_names.gguf_name`): a stacked
``ffn_*_exps`` tensor gives each expert its slice, ``attn_q``/``attn_k`` rows go back from llama.cpp's
interleaved RoPE pairs to Hugging Face's rotate-half order, a missing ``output.weight`` is a tied head.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from quantkit.errors import QuantkitError
from quantkit.formats.gguf.tensors import ROPE_FREQS
from quantkit.model.archs import ArchSpec
from quantkit.model.gguf_names import gguf_name


def gguf_state(reader: gguf.GGUFReader, arch: ArchSpec, config: dict[str, Any],
               disk_shapes: dict[str, tuple[int, ...]], path: Path) -> dict[str, torch.Tensor]:
    """On-disk checkpoint names -> float32 tensors of every GGUF tensor (``rope_freqs`` aside)."""
    n_layers = int(config["num_hidden_layers"])
    places: dict[str, list[tuple[str, int | None]]] = {}
    for name in disk_shapes:
        if config.get("tie_word_embeddings") and name.endswith("lm_head.weight"):
            continue
        target, expert = gguf_name(arch.model_type, name, n_layers)
        places.setdefault(target, []).append((name, expert))
    state: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        if tensor.name == ROPE_FREQS:
            continue
        targets = places.pop(tensor.name, None)
        if targets is None:
            raise QuantkitError(f"{path}: tensor {tensor.name} has no place in a {arch.model_type} model "
                                "with this file's hyperparameters")
        data = _unpermute_rope_rows(tensor.name, dequantized(tensor, path), arch, config)
        for name, expert in targets:
            part = data if expert is None else data[expert]
            if tuple(part.shape) != disk_shapes[name]:
                raise QuantkitError(f"{path}: {tensor.name} holds shape {list(part.shape)} for {name}, the model "
                                    f"needs {list(disk_shapes[name])}")
            state[name] = part
    return state


def dequantized(tensor: Any, path: Path) -> torch.Tensor:
    """float32 values of one ``gguf.ReaderTensor``, in numpy's shape order (rows last)."""
    try:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise QuantkitError(f"{path}: the gguf package cannot dequantize {tensor.name}'s type "
                            f"{tensor.tensor_type.name}") from None
    values = np.asarray(values, dtype=np.float32)
    if not values.flags.writeable:  # F32 data is a view of the file's read-only memory map: copied
        values = values.copy()
    return torch.from_numpy(values)


def rope_factors(reader: gguf.GGUFReader, path: Path) -> torch.Tensor | None:
    """Llama 3 RoPE's per-frequency divisors (``rope_freqs.weight``), or None."""
    tensor = next((t for t in reader.tensors if t.name == ROPE_FREQS), None)
    return None if tensor is None else dequantized(tensor, path)


def _unpermute_rope_rows(name: str, data: torch.Tensor, arch: ArchSpec, config: dict[str, Any]) -> torch.Tensor:
    """Inverse of GgufLayout._permute_rope_rows: interleaved pairs -> rotate-half rows, per head."""
    assert arch.gguf is not None and arch.gguf.export is not None
    kind = name.split(".")[-2] if name.startswith("blk.") else ""
    heads = dict(arch.gguf.export.permuted_rows).get(kind)
    if heads is None:
        return data
    n_head = int(config[heads])
    rows = data.shape[0]
    return data.reshape(n_head, rows // n_head // 2, 2, *data.shape[1:]).swapaxes(1, 2).reshape(data.shape)
