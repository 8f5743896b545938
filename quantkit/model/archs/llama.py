"""Llama (transformers ``llama``): dense decoder; also the shape of many dense families.

GGUF: llama.cpp's ``llama`` rotates interleaved pairs, so the rows of ``attn_q``/``attn_k`` are permuted
from Hugging Face's rotate-half order per head, as convert_hf_to_gguf.py's LlamaModel.permute does.
"""

from quantkit.model.archs import register_arch
from quantkit.model.archs.base import ArchSpec
from quantkit.model.gguf_spec import GgufExport, GgufKey, GgufSpec

LLAMA_GGUF = GgufSpec("llama", GgufExport(
    keys=(GgufKey("rope_dimension_count", ("head_dim",)), GgufKey("key_length", ("head_dim",)),
          GgufKey("value_length", ("head_dim",))),
    permuted_rows=(("attn_q", "num_attention_heads"), ("attn_k", "num_key_value_heads")),
))

SPEC = register_arch(ArchSpec(model_type="llama", description="Llama: dense decoder",
                              extra_config_keys=("intermediate_size",), gguf=LLAMA_GGUF))
