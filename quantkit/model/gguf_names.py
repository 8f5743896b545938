"""Hugging Face checkpoint names -> llama.cpp GGUF tensor names, via the ``gguf`` package's tables.

The architecture and per-tensor tables are ``gguf.TensorNameMap`` (the ones llama.cpp's
``convert_hf_to_gguf.py`` uses), looked up with the same ``.weight``/``.bias`` suffix handling.
Routed experts are stored per expert on disk (``...experts.7.gate_proj.weight``) but merged in GGUF
into one 3-D tensor per projection (``blk.N.ffn_gate_exps.weight``, one slice per expert), so a
per-expert name maps to the merged name plus its expert index (:meth:`ExpertLayout.stacked_name`).
Which llama.cpp architecture a model type is, is declared on its ArchSpec (``ArchSpec.gguf``); Mixtral
is converted as arch ``llama`` (its ``block_sparse_moe.experts.E.w1/w3/w2`` become ``ffn_gate/up/down_exps``).

DeepSeek V2 and V3 are both arch ``deepseek2``. Their ``self_attn.kv_b_proj`` maps to
``blk.N.attn_kv_b.weight``, the name ``gguf`` gives it, which is what older conversions hold and
what llama.cpp's non-MLA graph multiplies with the normalised latent ``kv_cmpr``, the very input
calibration sees for ``kv_b_proj``. Current ``convert_hf_to_gguf.py`` instead splits ``kv_b_proj``
into ``attn_k_b`` (transposed, per head) and ``attn_v_b`` for MLA absorption, and llama.cpp's
imatrix keys those by their own inputs: ``attn_k_b`` sees ``q_nope`` (the no-RoPE part of each
query head) and ``attn_v_b`` the attention-weighted latent of each head. Neither is the input of
any Hugging Face linear, so per-linear calibration statistics cannot produce them. quantkit's
imatrix therefore carries ``attn_kv_b``: right for GGUFs that hold ``attn_kv_b`` (older conversions,
or an export that keeps it); with a current MLA conversion llama-quantize finds no entry for
``attn_k_b``/``attn_v_b``, quantizes those two without importance weights, and never looks up
``attn_kv_b``.
"""

from __future__ import annotations

from functools import lru_cache

import gguf

from quantkit.errors import QuantkitError
from quantkit.model.archs import ARCHS, get_arch

# model_type -> llama.cpp architecture name, from each ArchSpec's GGUF spec (model/archs/)
GGUF_ARCH: dict[str, str] = {model_type: spec.gguf.arch for model_type, spec in ARCHS.items() if spec.gguf}
_MODEL_ARCH = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}
_SUFFIXES = (".weight", ".bias")  # as convert_hf_to_gguf.py's map_tensor_name tries them


@lru_cache(maxsize=32)
def _name_map(arch: str, num_layers: int) -> gguf.TensorNameMap:
    return gguf.get_tensor_name_map(_MODEL_ARCH[arch], num_layers)


def gguf_name(model_type: str, hf_name: str, num_layers: int) -> tuple[str, int | None]:
    """The llama.cpp tensor name for ``hf_name`` and, for a per-expert weight, its expert index."""
    spec = get_arch(model_type)
    if spec.gguf is None:
        raise QuantkitError(f"no GGUF architecture for model_type {model_type!r}; supported: {', '.join(GGUF_ARCH)}")
    key, expert = hf_name, None
    for suffix, renamed in spec.gguf.renames:
        if key.endswith(suffix):
            key = key.removesuffix(suffix) + renamed
    stacked = spec.experts.stacked_name(hf_name) if spec.experts is not None else None
    if stacked is not None:
        key, expert = stacked
    name = _name_map(spec.gguf.arch, num_layers).get_name(key, try_suffixes=_SUFFIXES)
    if name is None:
        raise QuantkitError(f"tensor {hf_name} has no llama.cpp GGUF name for {model_type} ({num_layers} layers)")
    return name, expert
