"""One run's GGUF: the plan grouped into GGUF tensors, each loaded in GGUF layout, stored, and the file written.

Loading follows llama.cpp's ``convert_hf_to_gguf.py``: routed experts are stacked into one 3-D tensor
(expert first), and where the architecture says so (arch ``llama``: Llama, Mixtral) the rows of
``attn_q``/``attn_k`` are permuted from Hugging Face's rotate-half RoPE layout back to the interleaved
pairs llama.cpp rotates.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import gguf
import numpy as np
import torch

from quantkit.errors import QuantkitError
from quantkit.formats.gguf.hparams import add_hparams, export_of, llama3_rope_factors, model_hparams
from quantkit.formats.gguf.tensors import gguf_tensors
from quantkit.formats.gguf.ternary import store_ternary
from quantkit.formats.gguf.tokenizer import add_tokenizer
from quantkit.formats.gguf.writer import write_gguf
from quantkit.formats.output import FileTensor, QuantizeItem, StoredTensor
from quantkit.plan import QuantPlan
from quantkit.schemes import BlockQuantized, KquantConfig, TernaryConfig


class GgufLayout:
    """The GGUF file of ``plan`` (a :class:`quantkit.formats.output.FileLayout`)."""

    def __init__(self, plan: QuantPlan) -> None:
        self.plan = plan
        self.export = export_of(plan.arch)
        self.hparams = model_hparams(plan.checkpoint, self.export)
        self.rope_factors = llama3_rope_factors(self.hparams)
        self.tensors = gguf_tensors(plan, self.export, self.hparams,
                                    None if self.rope_factors is None else len(self.rope_factors))
        self._source_of = {item.name: source.source for source in plan.sources for item in source.outputs}
        default = plan.recipe.default
        preset = default.kquant_preset if isinstance(default, KquantConfig) else None
        self.file_type = gguf.LlamaFileType[f"MOSTLY_{preset}"] if preset else gguf.LlamaFileType.GUESSED

    def load(self, tensor: FileTensor) -> torch.Tensor:
        """float32 data of ``tensor`` in GGUF layout: experts stacked, q/k rows permuted where the arch says so."""
        if not tensor.items:
            assert self.rope_factors is not None, f"{tensor.name} is computed from llama3 RoPE parameters"
            data = self.rope_factors
        else:
            checkpoint = self.plan.checkpoint
            views: dict[str, dict[str, torch.Tensor]] = {}  # a fused experts parameter is read once
            parts = []
            for item in tensor.items:
                source = self._source_of[item.name]
                if source not in views:
                    views[source] = self.plan.arch.per_expert_view(source, checkpoint.get(source))
                parts.append(views[source][item.name].to(torch.float32))
            data = torch.stack(parts) if len(tensor.shape) > parts[0].ndim else parts[0]
            data = self._permute_rope_rows(tensor.name, data)
        if tuple(data.shape) != tensor.shape:
            raise QuantkitError(f"{tensor.name}: loaded shape {list(data.shape)}, planned {list(tensor.shape)}")
        return data.contiguous()

    def store(self, tensor: FileTensor, data: torch.Tensor, quantize: QuantizeItem) -> StoredTensor:
        """F32 for unquantized tensors, F16 for float casts, else the items' ggml blocks stacked."""
        scheme = tensor.items[0].scheme if tensor.items else None
        if scheme is None:
            return StoredTensor(tensor.name, "F32", data.numpy())
        if isinstance(scheme, TernaryConfig):
            return store_ternary(tensor, data, quantize)
        if not isinstance(scheme, KquantConfig):  # the format admits k-quants, ternary and float casts only
            stored = data.numpy().astype(np.float16)
            return StoredTensor(tensor.name, "F16", stored, torch.from_numpy(stored.astype(np.float32)))
        rows = data.reshape(len(tensor.items), -1, data.shape[-1])  # one slice per expert
        blocks = []
        for item, weight in zip(tensor.items, rows, strict=True):
            quantized = quantize(item, weight)
            assert isinstance(quantized, BlockQuantized)
            blocks.append(quantized)
        packed = np.stack([q.data for q in blocks]).reshape(*data.shape[:-1], -1)
        values = torch.stack([q.dequantize() for q in blocks]).reshape(data.shape)
        return StoredTensor(tensor.name, blocks[0].ggml_type, packed, values, tuple(blocks))

    def write(self, path: Path, tensors: Iterable[StoredTensor]) -> None:
        """Write the GGUF at ``path``: ``tensors``, then the metadata, hyperparameters and tokenizer."""
        assert self.plan.arch.gguf is not None
        write_gguf(path, self.plan.arch.gguf.arch, self.tensors, tensors, self._add_metadata)

    def _add_metadata(self, writer: gguf.GGUFWriter) -> None:
        checkpoint = self.plan.checkpoint
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(checkpoint.path.name)
        add_hparams(writer, self.plan.arch, self.export, self.hparams)
        add_tokenizer(writer, checkpoint.path, int(self.hparams["vocab_size"]))
        writer.add_file_type(int(self.file_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    def _permute_rope_rows(self, name: str, data: torch.Tensor) -> torch.Tensor:
        """convert_hf_to_gguf.py's LlamaModel.permute: rotate-half row order -> interleaved pairs, per head."""
        kind = name.split(".")[-2] if name.startswith("blk.") else ""
        heads = dict(self.export.permuted_rows).get(kind)
        if heads is None:
            return data
        n_head = int(self.hparams[heads])
        rows = data.shape[0]
        return data.reshape(n_head, 2, rows // n_head // 2, *data.shape[1:]).swapaxes(1, 2).reshape(data.shape)
