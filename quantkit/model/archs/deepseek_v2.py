"""DeepSeek-V2 (transformers ``deepseek_v2``): routed + shared experts, group-limited routing,
dense first layers, MLA attention."""

from quantkit.model.archs import register_arch
from quantkit.model.archs.base import ArchSpec, ExpertLayout

SPEC = register_arch(
    ArchSpec(
        model_type="deepseek_v2",
        description="DeepSeekMoE (V2): routed + shared experts, group-limited routing",
        experts=ExpertLayout(),
        router_patterns=(r"\.mlp\.gate\.weight$",),
        shared_expert_patterns=(r"\.mlp\.shared_experts\.",),
        num_experts_keys=("n_routed_experts",),
        shared_experts_key="n_shared_experts",
        dense_layers="first_k_dense_replace",
        extra_config_keys=("n_group", "topk_group", "topk_method", "routed_scaling_factor",
                           "first_k_dense_replace", "moe_intermediate_size", "kv_lora_rank"),
    )
)
