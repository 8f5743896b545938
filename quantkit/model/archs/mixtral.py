"""Mixtral (transformers ``mixtral``): on disk ``block_sparse_moe.experts.E.w1/w2/w3``
(w1 = gate, w3 = up, w2 = down); transformers 5 renames the block to ``mlp`` in memory."""

from quantkit.model.archs import register_arch
from quantkit.model.archs.base import ArchSpec, ExpertLayout
from quantkit.model.archs.llama import LLAMA_GGUF

SPEC = register_arch(
    ArchSpec(
        model_type="mixtral",
        description="Mixtral: sparse MoE, 8-ish large experts, top-2",
        experts=ExpertLayout(disk_block="block_sparse_moe", gate="w1", up="w3", down="w2", memory_block="mlp"),
        router_patterns=(r"\.(block_sparse_moe|mlp)\.gate\.weight$",),
        num_experts_keys=("num_local_experts", "num_experts"),
        extra_config_keys=("intermediate_size",),
        disk_renames=((".block_sparse_moe.gate.", ".mlp.gate."),),
        gguf=LLAMA_GGUF,  # convert_hf_to_gguf.py converts Mixtral as llama with merged experts
    )
)
