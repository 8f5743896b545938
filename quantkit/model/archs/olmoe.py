"""OLMoE (transformers ``olmoe``): 64 small routed experts, top-8, QK-norm attention."""

from quantkit.model.archs import register_arch
from quantkit.model.archs.base import ArchSpec, ExpertLayout
from quantkit.model.gguf_spec import GgufSpec

SPEC = register_arch(
    ArchSpec(
        model_type="olmoe",
        description="OLMoE: fine-grained routed experts",
        experts=ExpertLayout(),
        router_patterns=(r"\.mlp\.gate\.weight$",),
        num_experts_keys=("num_experts", "num_local_experts"),
        extra_config_keys=("intermediate_size", "norm_topk_prob"),
        gguf=GgufSpec("olmoe"),  # tensor names only (imatrix): no GGUF export yet
    )
)
