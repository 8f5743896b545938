"""Qwen1.5/Qwen2-MoE (transformers ``qwen2_moe``): routed experts plus one shared expert whose
output is scaled by a sigmoid ``shared_expert_gate`` (kept in float like the router)."""

from quantkit.model.archs import register_arch
from quantkit.model.archs.base import ArchSpec, ExpertLayout

SPEC = register_arch(
    ArchSpec(
        model_type="qwen2_moe",
        description="Qwen2-MoE: routed experts + gated shared expert",
        experts=ExpertLayout(),
        router_patterns=(r"\.mlp\.gate\.weight$", r"\.mlp\.shared_expert_gate\.weight$"),
        shared_expert_patterns=(r"\.mlp\.shared_expert\.",),
        num_experts_keys=("num_experts",),
        shared_experts_key="shared_expert_intermediate_size",
        dense_layers="decoder_sparse_step",
        extra_config_keys=("moe_intermediate_size", "decoder_sparse_step", "norm_topk_prob"),
    )
)
