"""A GGUF file's hyperparameters, as llama.cpp reads them: the keys every architecture has, then the ones its
``GgufExport`` declares (:mod:`quantkit.model.gguf_spec`), as convert_hf_to_gguf.py writes them."""

from __future__ import annotations

import math
from typing import Any

import gguf
import torch

from quantkit.errors import QuantkitError
from quantkit.model.archs import ARCHS, ArchSpec
from quantkit.model.checkpoint import Checkpoint
from quantkit.model.gguf_spec import GgufExport, GgufKey

SUPPORTED_ROPE = ("default", "linear", "yarn", "llama3")


def exportable() -> list[str]:
    """The model types with a GGUF export: tensor names and hyperparameters declared on their ArchSpec."""
    return [model_type for model_type, spec in ARCHS.items() if spec.gguf is not None and spec.gguf.export]


def export_of(arch: ArchSpec) -> GgufExport:
    """How ``arch`` is exported; a one-line error for an architecture without a GGUF export."""
    if arch.gguf is None or arch.gguf.export is None:
        raise QuantkitError(f"GGUF export does not support model_type {arch.model_type!r}; "
                            f"supported: {', '.join(exportable())}")
    return arch.gguf.export


def model_hparams(checkpoint: Checkpoint, export: GgufExport) -> dict[str, Any]:
    """The checkpoint's config with transformers' defaults filled in; configurations llama.cpp runs differently
    raise."""
    import transformers  # deferred: heavy, and only GGUF export needs its config defaults here

    model_type = checkpoint.model_type
    raw = {k: v for k, v in checkpoint.config.items() if k != "model_type"}
    try:
        hparams: dict[str, Any] = transformers.AutoConfig.for_model(model_type, **raw).to_dict()
    except (ValueError, TypeError, KeyError) as exc:
        raise QuantkitError(f"invalid config.json in {checkpoint.path}: {exc}") from None
    if rope_type(hparams) not in SUPPORTED_ROPE:
        problem: str | None = f"RoPE type {rope_type(hparams)!r}"
    else:
        problem = next((r.problem for r in export.refusals if hparams.get(r.key) not in (r.ok, None)), None)
    if problem is not None:
        raise QuantkitError(f"GGUF export of {model_type}: llama.cpp cannot run {problem}")
    return hparams


def rope_parameters(hparams: dict[str, Any]) -> dict[str, Any]:
    rope = hparams.get("rope_parameters") or hparams.get("rope_scaling") or {}
    return dict(rope.get("full_attention", rope))


def rope_type(hparams: dict[str, Any]) -> str:
    rope = rope_parameters(hparams)
    return str(rope.get("rope_type") or rope.get("type") or "default")


def head_dim(hparams: dict[str, Any]) -> int:
    return int(hparams.get("head_dim") or hparams["hidden_size"] // hparams["num_attention_heads"])


def add_hparams(writer: gguf.GGUFWriter, arch: ArchSpec, export: GgufExport, hparams: dict[str, Any]) -> None:
    """The keys llama.cpp reads for the architecture, in convert_hf_to_gguf.py's order."""
    writer.add_block_count(int(hparams["num_hidden_layers"]))
    writer.add_context_length(int(hparams["max_position_embeddings"]))
    writer.add_embedding_length(int(hparams["hidden_size"]))
    writer.add_feed_forward_length(int(hparams["intermediate_size"]))
    writer.add_head_count(int(hparams["num_attention_heads"]))
    writer.add_head_count_kv(int(hparams[export.head_count_kv]))
    writer.add_layer_norm_rms_eps(float(hparams["rms_norm_eps"]))
    writer.add_vocab_size(int(hparams["vocab_size"]))
    _add_rope(writer, hparams)
    if n_experts := arch.num_experts(hparams):
        writer.add_expert_count(n_experts)
        writer.add_expert_used_count(int(hparams["num_experts_per_tok"]))
    values = {**hparams, "head_dim": head_dim(hparams)}
    for key in export.keys:
        _add_key(writer, key, values)
    if export.gating_func is not None:
        writer.add_expert_gating_func(gguf.ExpertGatingFuncType[export.gating_func])
    routing = export.group_routing
    grouped = routing is not None and (routing.only_if is None or hparams.get(routing.only_if[0]) == routing.only_if[1])
    if grouped and (n_group := int(hparams.get("n_group") or 1)) > 1:
        writer.add_expert_group_count(n_group)
        writer.add_expert_group_used_count(int(hparams["topk_group"]))
    if export.rope_yarn_log_mul and (mscale_all_dim := rope_parameters(hparams).get("mscale_all_dim")) is not None:
        writer.add_rope_scaling_yarn_log_mul(0.1 * float(mscale_all_dim))  # llama.cpp divides by 0.1 again


def _add_key(writer: gguf.GGUFWriter, key: GgufKey, values: dict[str, Any]) -> None:
    add = getattr(writer, f"add_{key.key}")
    first = values.get(key.sources[0])
    if key.kind == "flag":
        if first:
            add(True)
    elif key.kind == "float":
        if first is not None:
            add(float(first))
    else:
        missing = [s for s in key.sources if values.get(s) is None] if key.default is None else []
        if missing:
            raise QuantkitError(f"GGUF export needs {missing[0]} in config.json (for {key.key})")
        add(sum(int(values.get(s) or key.default or 0) for s in key.sources))


def _add_rope(writer: gguf.GGUFWriter, hparams: dict[str, Any]) -> None:
    rope = rope_parameters(hparams)
    theta = rope.get("rope_theta", hparams.get("rope_theta"))
    if theta is not None:
        writer.add_rope_freq_base(float(theta))
    kind, factor = rope_type(hparams), rope.get("factor")
    if kind == "linear" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(factor))
    elif kind == "yarn" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(factor))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
        if (ext := rope.get("extrapolation_factor")) is not None:
            writer.add_rope_scaling_yarn_ext_factor(float(ext))
        if (attn := rope.get("attention_factor", rope.get("attn_factor"))) is not None:
            writer.add_rope_scaling_yarn_attn_factor(float(attn))
        if (beta_fast := rope.get("beta_fast")) is not None:
            writer.add_rope_scaling_yarn_beta_fast(float(beta_fast))
        if (beta_slow := rope.get("beta_slow")) is not None:
            writer.add_rope_scaling_yarn_beta_slow(float(beta_slow))


def llama3_rope_factors(hparams: dict[str, Any]) -> torch.Tensor | None:
    """convert_hf_to_gguf.py's ``rope_freqs`` for Llama 3 RoPE scaling (one factor per rotated pair); None for
    other RoPE types."""
    if rope_type(hparams) != "llama3":
        return None
    rope = rope_parameters(hparams)
    dim = head_dim(hparams)
    base = float(rope.get("rope_theta", hparams.get("rope_theta", 10000.0)))
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_context = float(rope.get("original_max_position_embeddings", 8192))
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old_context / high:
            factors.append(1.0)
        elif wavelen > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)

