"""On-disk formats: packing, the registered output formats, sharded safetensors output, and the loader.

Importing the package registers every output format in :data:`quantkit.formats.output.OUTPUT_FORMATS`.
"""

from quantkit.formats import compressed_tensors, ggml_blocks, gguf, gptq_v1

__all__ = ["compressed_tensors", "ggml_blocks", "gguf", "gptq_v1"]
