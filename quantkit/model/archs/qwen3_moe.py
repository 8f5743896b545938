"""Qwen3-MoE (transformers ``qwen3_moe``): routed experts only, no shared expert."""

from quantkit.model.archs import register_arch
from quantkit.model.archs.base import ArchSpec, ExpertLayout
from quantkit.model.gguf_spec import GgufSpec

SPEC = register_arch(
    ArchSpec(
        model_type="qwen3_moe",
        description="Qwen3-MoE: routed experts",
        experts=ExpertLayout(),
        router_patterns=(r"\.mlp\.gate\.weight$",),
        num_experts_keys=("num_experts", "num_local_experts"),
        dense_layers="decoder_sparse_step",
        extra_config_keys=("moe_intermediate_size", "decoder_sparse_step", "norm_topk_prob"),
        gguf=GgufSpec("qwen3moe"),  # tensor names only (imatrix): no GGUF export yet
    )
)
