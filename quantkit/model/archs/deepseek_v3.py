"""DeepSeek-V3 / R1 (transformers ``deepseek_v3``): fine-grained routed experts, shared experts,
group-limited routing (``n_group``/``topk_group``), dense first layers, MLA attention.

GGUF: arch ``deepseek2`` as V2 (see deepseek_v2.py), with sigmoid gating and routing always limited
to the best groups.
"""

from dataclasses import replace

from quantkit.model.archs import register_arch
from quantkit.model.archs.base import ArchSpec, ExpertLayout
from quantkit.model.archs.deepseek_v2 import DEEPSEEK2_EXPORT, DEEPSEEK2_GGUF
from quantkit.model.gguf_spec import GroupRouting, Refusal

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
        gguf=replace(DEEPSEEK2_GGUF, export=replace(
            DEEPSEEK2_EXPORT, gating_func="SIGMOID", group_routing=GroupRouting(),
            refusals=(Refusal("rope_interleave", True,
                              "rope_interleave=false (llama.cpp rotates interleaved pairs)"),),
        )),
    )
)
