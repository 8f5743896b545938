"""Qwen1.5/Qwen2-MoE (transformers ``qwen2_moe``): routed experts plus one shared expert whose
output is scaled by a sigmoid ``shared_expert_gate`` (kept in float like the router).

GGUF: llama.cpp's ``qwen2moe`` runs experts in every layer over the whole context, never renormalises
the top-k weights, and needs ``output.weight`` even when the embeddings are tied.
"""

from quantkit.model.archs import register_arch
from quantkit.model.archs.base import ArchSpec, ExpertLayout
from quantkit.model.gguf_spec import GgufExport, GgufKey, GgufSpec, Refusal

_DENSE_LAYERS = "dense layers between MoE layers (llama.cpp's qwen2moe has experts in every layer)"

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
        gguf=GgufSpec("qwen2moe", GgufExport(
            keys=(GgufKey("expert_feed_forward_length", ("moe_intermediate_size",)),
                  GgufKey("expert_shared_feed_forward_length", ("shared_expert_intermediate_size",))),
            output_when_tied=True,
            refusals=(
                Refusal("norm_topk_prob", False,
                        "norm_topk_prob=true (llama.cpp's qwen2moe does not renormalise the top-k weights)"),
                Refusal("decoder_sparse_step", 1, _DENSE_LAYERS),
                Refusal("mlp_only_layers", [], _DENSE_LAYERS),
                Refusal("use_sliding_window", False,
                        "sliding-window attention (llama.cpp's qwen2moe attends to the whole context)"),
            ),
        )),
    )
)
