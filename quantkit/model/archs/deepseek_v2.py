"""DeepSeek-V2 (transformers ``deepseek_v2``): routed + shared experts, group-limited routing,
dense first layers, MLA attention.

GGUF (arch ``deepseek2``, V2 and V3): the unsplit ``attn_kv_b`` is kept and no MLA key/value lengths
are written, so llama.cpp runs its non-MLA graph (``hparams.is_mla()`` is false), multiplying
``attn_kv_b`` with the normalised latent, the very input calibration sees for ``kv_b_proj``. Its KV
cache holds full per-head keys and values (``head_count_kv`` = ``head_count``), as older conversions did.
"""

from quantkit.model.archs import register_arch
from quantkit.model.archs.base import ArchSpec, ExpertLayout
from quantkit.model.gguf_spec import GgufExport, GgufKey, GgufSpec, GroupRouting

DEEPSEEK2_EXPORT = GgufExport(
    head_count_kv="num_attention_heads",
    keys=(
        GgufKey("leading_dense_block_count", ("first_k_dense_replace",), default=0),
        GgufKey("q_lora_rank", ("q_lora_rank",), default=0, zero_means_none=True),  # 0: a plain attn_q
        GgufKey("kv_lora_rank", ("kv_lora_rank",)),
        GgufKey("key_length", ("qk_nope_head_dim", "qk_rope_head_dim")),
        GgufKey("value_length", ("v_head_dim",)),
        GgufKey("rope_dimension_count", ("qk_rope_head_dim",)),
        GgufKey("expert_feed_forward_length", ("moe_intermediate_size",)),
        GgufKey("expert_shared_count", ("n_shared_experts",), default=0),
        GgufKey("expert_weights_scale", ("routed_scaling_factor",), kind="float"),
        GgufKey("expert_weights_norm", ("norm_topk_prob",), kind="flag"),
    ),
    gating_func="SOFTMAX",
    group_routing=GroupRouting(only_if=("topk_method", "group_limited_greedy")),
    rope_yarn_log_mul=True,
)
DEEPSEEK2_GGUF = GgufSpec(
    "deepseek2",
    DEEPSEEK2_EXPORT,
    # convert_hf_to_gguf.py's DeepseekV2Model renames the router bias; gguf's table has only the new name
    renames=(("e_score_correction_bias", "e_score_correction.bias"),),
)

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
        gguf=DEEPSEEK2_GGUF,
    )
)
