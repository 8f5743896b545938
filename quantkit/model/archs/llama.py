"""Llama (transformers ``llama``): dense decoder; also the shape of many dense families."""

from quantkit.model.archs import register_arch
from quantkit.model.archs.base import ArchSpec

SPEC = register_arch(ArchSpec(model_type="llama", description="Llama: dense decoder",
                              extra_config_keys=("intermediate_size",)))
