"""DeepSeek-V3 / R1 (transformers ``deepseek_v3``): fine-grained routed experts, shared experts,
group-limited routing (``n_group``/``topk_group``), dense first layers, MLA attention."""

from quantkit.model.archs import register_arch
from quantkit.model.archs.base import ArchSpec, ExpertLayout

SPEC = register_arch(
    ArchSpec(
        model_type="deepseek_v3",
        description="DeepSeekMoE (V3): routed + shared experts, group-limited routing",
        experts=ExpertLayout(),
        router_patterns=(r"\.mlp\.gate\.(weight|e_score_correction_bias)$",),
        shared_expert_patterns=(r"\.mlp\.shared_experts\.",),
        num_experts_keys=("n_routed_experts",),
        shared_experts_key="n_shared_experts",
        dense_layers="first_k_dense_replace",
        extra_config_keys=("n_group", "topk_group", "routed_scaling_factor", "first_k_dense_replace",
                           "moe_intermediate_size", "kv_lora_rank", "q_lora_rank"),
    )
)
