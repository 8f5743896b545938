"""Qwen2 (transformers ``qwen2``): dense decoder with q/k/v biases."""

from quantkit.model.archs import register_arch
from quantkit.model.archs.base import ArchSpec
from quantkit.model.gguf_spec import GgufSpec

SPEC = register_arch(ArchSpec(model_type="qwen2", description="Qwen2: dense decoder",
                              extra_config_keys=("intermediate_size",),
                              gguf=GgufSpec("qwen2")))  # tensor names only (imatrix): no GGUF export yet
