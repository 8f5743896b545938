"""Architecture specs against transformers itself: names, roles, fused <-> per-expert views."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from quantkit.errors import QuantkitError
from quantkit.model.archs import ARCHS, Role, get_arch
from tests.conftest import ARCH_CONFIGS, MOE_ARCHS


def test_every_family_of_the_issue_is_registered() -> None:
    assert set(ARCHS) == set(ARCH_CONFIGS)


def test_unsupported_model_type_names_the_supported_ones() -> None:
    with pytest.raises(QuantkitError) as info:
        get_arch("gpt2")
    message = str(info.value)
    assert "unsupported model_type 'gpt2'" in message and "deepseek_v3" in message and "\n" not in message


@pytest.mark.parametrize("arch", list(ARCH_CONFIGS))
def test_memory_state_equals_transformers_own_loading(arch: str, tiny_models: dict[str, Path]) -> None:
    """Our disk -> memory conversion (fusing experts, renames) equals what from_pretrained builds."""
    import transformers

    path = tiny_models[arch]
    disk = load_file(str(path / "model.safetensors"))
    ours = get_arch(arch).to_memory_state(disk)
    with contextlib.redirect_stderr(io.StringIO()):
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    theirs = model.state_dict()
    assert set(ours) <= set(theirs)
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name]), name


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_split_fused_inverts_fuse(arch: str, tiny_models: dict[str, Path]) -> None:
    spec = get_arch(arch)
    assert spec.experts is not None
    disk = load_file(str(tiny_models[arch] / "model.safetensors"))
    memory = spec.experts.fuse(disk)
    fused = [n for n in memory if spec.is_fused(n)]
    assert fused, "no fused expert parameters"
    recovered: dict[str, torch.Tensor] = {}
    for name in fused:
        recovered.update(spec.experts.split_fused(name, memory[name]))
    experts_on_disk = {n: t for n, t in disk.items() if spec.experts.per_expert_pattern.match(n)}
    assert recovered.keys() == experts_on_disk.keys()
    for name, tensor in experts_on_disk.items():
        assert torch.equal(recovered[name], tensor)


@pytest.mark.parametrize(
    ("arch", "name", "role"),
    [
        ("deepseek_v3", "model.layers.1.mlp.gate.weight", Role.ROUTER),
        ("deepseek_v3", "model.layers.1.mlp.gate.e_score_correction_bias", Role.ROUTER),
        ("deepseek_v3", "model.layers.1.mlp.shared_experts.down_proj.weight", Role.SHARED_EXPERT),
        ("deepseek_v3", "model.layers.1.mlp.experts.7.up_proj.weight", Role.ROUTED_EXPERT),
        ("deepseek_v3", "model.layers.0.mlp.gate_proj.weight", Role.DENSE_MLP),
        ("deepseek_v3", "model.layers.0.self_attn.kv_a_layernorm.weight", Role.NORM),
        ("deepseek_v3", "model.layers.0.self_attn.kv_b_proj.weight", Role.ATTENTION),
        ("qwen2_moe", "model.layers.0.mlp.shared_expert_gate.weight", Role.ROUTER),
        ("qwen2_moe", "model.layers.0.mlp.shared_expert.gate_proj.weight", Role.SHARED_EXPERT),
        ("mixtral", "model.layers.0.block_sparse_moe.gate.weight", Role.ROUTER),
        ("mixtral", "model.layers.0.block_sparse_moe.experts.3.w2.weight", Role.ROUTED_EXPERT),
        ("qwen3_moe", "model.layers.0.mlp.experts.gate_up_proj", Role.ROUTED_EXPERT),
        ("llama", "model.embed_tokens.weight", Role.EMBEDDING),
        ("llama", "lm_head.weight", Role.LM_HEAD),
        ("llama", "model.norm.weight", Role.NORM),
    ],
)
def test_roles(arch: str, name: str, role: Role) -> None:
    assert get_arch(arch).role(name) is role


def test_moe_layer_bookkeeping() -> None:
    deepseek = get_arch("deepseek_v3")
    assert deepseek.moe_layers({"num_hidden_layers": 4, "n_routed_experts": 8, "first_k_dense_replace": 1}) == [1, 2, 3]
    qwen = get_arch("qwen2_moe")
    config = {"num_hidden_layers": 4, "num_experts": 4, "decoder_sparse_step": 2, "mlp_only_layers": [3]}
    assert qwen.moe_layers(config) == [1]
    assert get_arch("llama").moe_layers({"num_hidden_layers": 4}) == []


def test_fused_sources_name_the_on_disk_then_the_in_memory_block() -> None:
    mixtral = get_arch("mixtral").experts
    assert mixtral is not None
    assert mixtral.fused_sources("model.layers.3.block_sparse_moe.experts.7.w2.weight") == [
        "model.layers.3.block_sparse_moe.experts.down_proj", "model.layers.3.mlp.experts.down_proj"]
    assert mixtral.fused_sources("model.layers.3.block_sparse_moe.experts.7.w3.weight")[0].endswith("gate_up_proj")
    deepseek = get_arch("deepseek_v3").experts
    assert deepseek is not None
    assert deepseek.fused_sources("model.layers.1.mlp.experts.0.up_proj.weight") == [
        "model.layers.1.mlp.experts.gate_up_proj"]
    assert deepseek.fused_sources("model.layers.1.mlp.shared_experts.up_proj.weight") == []
