"""Write a llama.cpp-loadable GGUF from a Hugging Face checkpoint and per-tensor (ggml type, data).

Three steps, so that the quantize pipeline can quantize one tensor at a time:

* :func:`gguf_sources` plans every GGUF tensor from names and shapes alone: its GGUF name (via
  :mod:`quantkit.model.gguf_names`), the checkpoint tensors it is made of and its float shape
  as GGUF stores it (numpy order, rows last: ``[..., n_rows, n_per_row]``).
* :func:`load_source` reads one planned tensor as float32 in that layout, with the transforms of
  llama.cpp's ``convert_hf_to_gguf.py``: routed experts stacked into one 3-D tensor (expert
  first), and for arch ``llama`` (Llama, Mixtral) the rows of ``q_proj``/``k_proj`` permuted from
  Hugging Face's rotate-half RoPE layout back to the interleaved pairs llama.cpp rotates.
* :func:`write_gguf` writes the tensors it is handed, the architecture's hyperparameters and the
  tokenizer, atomically: a temporary file in the target directory is renamed over ``path`` only
  once complete, so an interrupted export never leaves a complete-looking file.

DeepSeek V2/V3 (arch ``deepseek2``) keep the unsplit ``attn_kv_b`` and write no MLA key/value
lengths: llama.cpp then runs its non-MLA graph (``hparams.is_mla()`` is false), multiplying
``attn_kv_b`` with the normalised latent, the very input calibration sees for ``kv_b_proj``. Its
KV cache holds full per-head keys and values (``head_count_kv`` = ``head_count``), as older
conversions did.
"""

from __future__ import annotations

import json
import math
import struct
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from quantkit.errors import QuantkitError
from quantkit.formats.gguf_file import atomic_gguf
from quantkit.model.archs import ArchSpec, get_arch
from quantkit.model.checkpoint import Checkpoint
from quantkit.model.gguf_names import GGUF_ARCH, gguf_name
from quantkit.plan import natural_key

GGML = gguf.GGMLQuantizationType
SUPPORTED_MODEL_TYPES = ("llama", "mixtral", "qwen2_moe", "deepseek_v2", "deepseek_v3")
FLOAT_DTYPES: dict[GGML, type[np.floating[Any]]] = {GGML.F32: np.float32, GGML.F16: np.float16}
# GGUF tensors llama.cpp (and convert_hf_to_gguf.py) keep in F32 besides 1-D ones: routers and biases
_F32_SUFFIXES = ("_norm.weight", "ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight", ".bias")
_ROPE_FREQS = "rope_freqs.weight"
_SPOOL_BYTES = 256 * 1024 * 1024  # staged tensor data beyond this goes to disk
_PERMUTED = {"attn_q": "num_attention_heads", "attn_k": "num_key_value_heads"}  # arch llama: RoPE row order


@dataclass(frozen=True)
class GgufSource:
    """One GGUF tensor and where it comes from."""

    name: str  # GGUF name, e.g. "blk.1.ffn_down_exps.weight"
    hf_names: tuple[str, ...]  # checkpoint tensors: one per expert (expert order) for merged experts; () if computed
    shape: tuple[int, ...]  # numpy shape of the float tensor as GGUF stores it, rows last

    @property
    def keeps_f32(self) -> bool:
        """Norms, routers, biases and other 1-D tensors: llama.cpp wants them in F32."""
        return len(self.shape) == 1 or self.name.endswith(_F32_SUFFIXES)


def gguf_sources(checkpoint: Checkpoint) -> list[GgufSource]:
    """Every tensor of the GGUF for ``checkpoint``, planned from names and shapes (no data loaded)."""
    hparams = model_hparams(checkpoint)
    model_type = checkpoint.model_type
    arch = get_arch(model_type)
    n_layers = int(hparams["num_hidden_layers"])
    tied = bool(hparams.get("tie_word_embeddings"))
    singles: dict[str, GgufSource] = {}
    experts: dict[str, dict[int, tuple[str, tuple[int, ...]]]] = {}
    order: dict[str, None] = {}
    for hf_name, shape in _disk_tensors(checkpoint, arch):
        if _skipped(hf_name, n_layers, tied):
            continue
        name, expert = gguf_name(model_type, hf_name, n_layers)
        if name in singles or (expert is None and name in experts):
            raise QuantkitError(f"{hf_name}: a second checkpoint tensor for GGUF tensor {name}")
        if expert is None:
            singles[name] = GgufSource(name, (hf_name,), shape)
        else:
            experts.setdefault(name, {})[expert] = (hf_name, shape)
        order[name] = None
    n_experts = arch.num_experts(hparams)
    for name, parts in experts.items():
        if sorted(parts) != list(range(n_experts)) or len({shape for _, shape in parts.values()}) != 1:
            raise QuantkitError(f"{name}: the checkpoint holds experts {sorted(parts)} of {n_experts}, or mixed shapes")
        hf_names = tuple(parts[e][0] for e in range(n_experts))
        singles[name] = GgufSource(name, hf_names, (n_experts, *parts[0][1]))
    sources = [singles[name] for name in order]
    if _rope_type(hparams) == "llama3":
        sources.append(GgufSource(_ROPE_FREQS, (), (_head_dim(hparams) // 2,)))
    if model_type == "qwen2_moe" and tied:  # llama.cpp's qwen2moe requires output.weight
        sources.append(GgufSource("output.weight", singles["token_embd.weight"].hf_names,
                                  singles["token_embd.weight"].shape))
    return sources


def load_source(checkpoint: Checkpoint, source: GgufSource) -> np.ndarray:
    """float32 data of ``source`` in GGUF layout: experts stacked, llama's q/k rows permuted."""
    hparams = model_hparams(checkpoint)
    if not source.hf_names:
        data = _llama3_rope_factors(hparams)
    else:
        fused: dict[str, dict[str, torch.Tensor]] = {}
        parts = [_read(checkpoint, name, fused).to(torch.float32) for name in source.hf_names]
        data = torch.stack(parts) if len(source.shape) > parts[0].ndim else parts[0]
        if GGUF_ARCH[checkpoint.model_type] == "llama":
            data = _permute_rope_rows(source.name, data, hparams)
    array = np.ascontiguousarray(data.numpy(), dtype=np.float32)
    if array.shape != source.shape:
        raise QuantkitError(f"{source.name}: loaded shape {list(array.shape)}, planned {list(source.shape)}")
    return array


def write_gguf(
    path: Path,
    checkpoint: Checkpoint,
    tensors: Iterable[tuple[str, gguf.GGMLQuantizationType, np.ndarray]],
    *,
    file_type: int | None = None,
    extra_metadata: dict[str, Any] | None = None,
) -> None:
    """Write ``path`` atomically: metadata and tokenizer of ``checkpoint``, then ``tensors`` in the order given.

    Each item is (GGUF name, ggml type, data): F32/F16 data is a float array of the planned shape,
    other types uint8 ggml blocks ``[..., n_rows, row_bytes]``. Every planned tensor must come
    exactly once. ``file_type`` defaults to the type holding most weights (``general.file_type``).
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise QuantkitError(f"cannot write {path}: no directory {path.parent}")
    plan = {source.name: source for source in gguf_sources(checkpoint)}
    hparams = model_hparams(checkpoint)
    with atomic_gguf(path, lambda tmp: gguf.GGUFWriter(tmp, GGUF_ARCH[checkpoint.model_type], use_temp_file=True)) \
            as writer, tempfile.SpooledTemporaryFile(_SPOOL_BYTES, "w+b", dir=str(path.parent)) as staging:
        writer.temp_file = staging  # tensor data is staged next to the output, not in /tmp: it is as large as the model
        weights = _add_tensors(writer, plan, tensors)
        if plan:
            raise QuantkitError(f"GGUF export of {checkpoint.path} got no data for {len(plan)} tensor(s), "
                                f"e.g. {next(iter(plan))}")
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(checkpoint.path.name)
        _add_hparams(writer, checkpoint.model_type, hparams)
        _add_tokenizer(writer, checkpoint.path, int(hparams["vocab_size"]))
        writer.add_file_type(file_type if file_type is not None else _file_type(weights))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for key, value in (extra_metadata or {}).items():
            _add_value(writer, key, value)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()


def _add_tensors(writer: gguf.GGUFWriter, plan: dict[str, GgufSource],
                 tensors: Iterable[tuple[str, gguf.GGMLQuantizationType, np.ndarray]]) -> dict[GGML, int]:
    """Stage every tensor (popping it from ``plan``); the number of matrix weights per ggml type."""
    weights: dict[GGML, int] = {}
    for name, ggml_type, data in tensors:
        source = plan.pop(name, None)
        if source is None:
            raise QuantkitError(f"GGUF tensor {name} is not planned for this checkpoint, or comes twice")
        kind = GGML(ggml_type)
        writer.add_tensor(name, _checked_data(source, kind, data), raw_dtype=None if kind in FLOAT_DTYPES else kind)
        if len(source.shape) > 1:
            weights[kind] = weights.get(kind, 0) + math.prod(source.shape)
    return weights


def model_hparams(checkpoint: Checkpoint) -> dict[str, Any]:
    """The checkpoint's config with transformers' defaults filled in; unsupported models raise."""
    import transformers

    model_type = checkpoint.model_type
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise QuantkitError(f"GGUF export does not support model_type {model_type!r}; "
                            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    raw = {k: v for k, v in checkpoint.config.items() if k != "model_type"}
    try:
        hparams: dict[str, Any] = transformers.AutoConfig.for_model(model_type, **raw).to_dict()
    except (ValueError, TypeError, KeyError) as exc:
        raise QuantkitError(f"invalid config.json in {checkpoint.path}: {exc}") from None
    _check_supported(model_type, hparams)
    return hparams


def _check_supported(model_type: str, hparams: dict[str, Any]) -> None:
    """Configurations llama.cpp's graph for the arch would run differently from transformers."""
    problem = None
    if _rope_type(hparams) not in ("default", "linear", "yarn", "llama3"):
        problem = f"RoPE type {_rope_type(hparams)!r}"
    elif model_type == "deepseek_v3" and hparams.get("rope_interleave") is False:
        problem = "rope_interleave=false (llama.cpp rotates interleaved pairs)"
    elif model_type == "qwen2_moe" and hparams.get("norm_topk_prob"):
        problem = "norm_topk_prob=true (llama.cpp's qwen2moe does not renormalise the top-k weights)"
    elif model_type == "qwen2_moe" and (hparams.get("decoder_sparse_step", 1) != 1 or hparams.get("mlp_only_layers")):
        problem = "dense layers between MoE layers (llama.cpp's qwen2moe has experts in every layer)"
    elif model_type == "qwen2_moe" and hparams.get("use_sliding_window"):
        problem = "sliding-window attention (llama.cpp's qwen2moe attends to the whole context)"
    if problem is not None:
        raise QuantkitError(f"GGUF export of {model_type}: llama.cpp cannot run {problem}")


def _disk_tensors(checkpoint: Checkpoint, arch: ArchSpec) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(on-disk name, shape) of every tensor, fused experts split per expert, in natural order."""
    found: dict[str, tuple[int, ...]] = {}
    for name, info in checkpoint.tensors.items():
        if arch.experts is not None and arch.is_fused(name):
            found.update(arch.experts.fused_shapes(name, info.shape))
        else:
            found[name] = tuple(info.shape)
    for name in sorted(found, key=natural_key):
        yield name, found[name]


def _skipped(hf_name: str, n_layers: int, tied: bool) -> bool:
    """Tensors the GGUF leaves out: RoPE caches, a tied lm_head, layers past the decoder (DeepSeek MTP)."""
    if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name.endswith("lm_head.weight")):
        return True
    parts = hf_name.split(".")
    if "layers" in parts and parts.index("layers") + 1 < len(parts):
        layer = parts[parts.index("layers") + 1]
        return layer.isdigit() and int(layer) >= n_layers
    return False


def _read(checkpoint: Checkpoint, hf_name: str, fused: dict[str, dict[str, torch.Tensor]]) -> torch.Tensor:
    """A checkpoint tensor, or one expert's slice of a fused experts parameter (each fused one read once)."""
    if hf_name in checkpoint:
        return checkpoint.get(hf_name)
    layout = get_arch(checkpoint.model_type).experts
    sources = [s for s in layout.fused_sources(hf_name) if s in checkpoint] if layout is not None else []
    if layout is not None and sources:
        if sources[0] not in fused:
            fused[sources[0]] = layout.split_fused(sources[0], checkpoint.get(sources[0]))
        return fused[sources[0]][hf_name]
    raise QuantkitError(f"tensor {hf_name} is not in {checkpoint.path}")


def _permute_rope_rows(name: str, data: torch.Tensor, hparams: dict[str, Any]) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute: rotate-half row order -> interleaved pairs, per head."""
    kind = name.split(".")[-2] if name.startswith("blk.") else ""
    if kind not in _PERMUTED:
        return data
    n_head = int(hparams[_PERMUTED[kind]])
    rows = data.shape[0]
    return data.reshape(n_head, 2, rows // n_head // 2, *data.shape[1:]).swapaxes(1, 2).reshape(data.shape)


def _checked_data(source: GgufSource, ggml_type: GGML, data: np.ndarray) -> np.ndarray:
    """``data`` as GGUFWriter wants it, after checking it fits ``source``'s shape and F32 rule."""
    if source.keeps_f32 and ggml_type != GGML.F32:
        raise QuantkitError(f"{source.name} must stay F32 for llama.cpp, got {ggml_type.name}")
    if ggml_type in FLOAT_DTYPES:
        shape = tuple(data.shape)
        array = np.ascontiguousarray(data, dtype=FLOAT_DTYPES[ggml_type])
    else:
        if data.dtype != np.uint8:
            raise QuantkitError(f"{source.name}: {ggml_type.name} data must be uint8 ggml blocks, got {data.dtype}")
        try:
            shape = gguf.quant_shape_from_byte_shape(data.shape, ggml_type)
        except ValueError as exc:
            raise QuantkitError(f"{source.name}: {exc}") from None
        array = np.ascontiguousarray(data)
    if shape != source.shape:
        raise QuantkitError(f"{source.name}: {ggml_type.name} data holds shape {list(shape)}, "
                            f"GGUF needs {list(source.shape)}")
    return array


def _file_type(weights: dict[GGML, int]) -> int:
    """``general.file_type`` for the ggml type holding most weights of the matrices."""
    if not weights:
        return int(gguf.LlamaFileType.ALL_F32)
    main = max(weights, key=lambda t: weights[t])
    if main == GGML.F32:
        return int(gguf.LlamaFileType.ALL_F32)
    for name in (f"MOSTLY_{main.name}", f"MOSTLY_{main.name}_M"):
        if name in gguf.LlamaFileType.__members__:
            return int(gguf.LlamaFileType[name])
    return int(gguf.LlamaFileType.GUESSED)


def _add_value(writer: gguf.GGUFWriter, key: str, value: Any) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        if -(2**31) <= value < 2**31:
            writer.add_int32(key, value)
        else:
            writer.add_int64(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, (list, tuple)):
        writer.add_array(key, list(value))
    else:
        raise QuantkitError(f"GGUF metadata {key}: cannot store a {type(value).__name__}")


# --- hyperparameters ---------------------------------------------------------------------------------


def _rope_parameters(hparams: dict[str, Any]) -> dict[str, Any]:
    rope = hparams.get("rope_parameters") or hparams.get("rope_scaling") or {}
    return dict(rope.get("full_attention", rope))


def _rope_type(hparams: dict[str, Any]) -> str:
    rope = _rope_parameters(hparams)
    return str(rope.get("rope_type") or rope.get("type") or "default")


def _head_dim(hparams: dict[str, Any]) -> int:
    return int(hparams.get("head_dim") or hparams["hidden_size"] // hparams["num_attention_heads"])


def _add_hparams(writer: gguf.GGUFWriter, model_type: str, hparams: dict[str, Any]) -> None:
    """The keys llama.cpp reads for the arch, as convert_hf_to_gguf.py writes them."""
    deepseek = model_type.startswith("deepseek")
    writer.add_block_count(int(hparams["num_hidden_layers"]))
    writer.add_context_length(int(hparams["max_position_embeddings"]))
    writer.add_embedding_length(int(hparams["hidden_size"]))
    writer.add_feed_forward_length(int(hparams["intermediate_size"]))
    writer.add_head_count(int(hparams["num_attention_heads"]))
    # deepseek2 without MLA lengths caches full keys/values for every head
    writer.add_head_count_kv(int(hparams["num_attention_heads" if deepseek else "num_key_value_heads"]))
    writer.add_layer_norm_rms_eps(float(hparams["rms_norm_eps"]))
    writer.add_vocab_size(int(hparams["vocab_size"]))
    _add_rope(writer, hparams)
    arch = get_arch(model_type)
    if n_experts := arch.num_experts(hparams):
        writer.add_expert_count(n_experts)
        writer.add_expert_used_count(int(hparams["num_experts_per_tok"]))
    if model_type in ("llama", "mixtral"):
        writer.add_rope_dimension_count(_head_dim(hparams))
        writer.add_key_length(_head_dim(hparams))
        writer.add_value_length(_head_dim(hparams))
    elif model_type == "qwen2_moe":
        writer.add_expert_feed_forward_length(int(hparams["moe_intermediate_size"]))
        writer.add_expert_shared_feed_forward_length(int(hparams["shared_expert_intermediate_size"]))
    else:
        _add_deepseek(writer, model_type, hparams)


def _add_rope(writer: gguf.GGUFWriter, hparams: dict[str, Any]) -> None:
    rope = _rope_parameters(hparams)
    theta = rope.get("rope_theta", hparams.get("rope_theta"))
    if theta is not None:
        writer.add_rope_freq_base(float(theta))
    rope_type, factor = _rope_type(hparams), rope.get("factor")
    if rope_type == "linear" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(factor))
    elif rope_type == "yarn" and factor is not None:
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


def _add_deepseek(writer: gguf.GGUFWriter, model_type: str, hparams: dict[str, Any]) -> None:
    """deepseek2 (V2 and V3) without MLA key/value lengths: the legacy graph using attn_kv_b."""
    writer.add_leading_dense_block_count(int(hparams.get("first_k_dense_replace") or 0))
    writer.add_q_lora_rank(int(hparams.get("q_lora_rank") or 0))  # 0: a plain attn_q
    writer.add_kv_lora_rank(int(hparams["kv_lora_rank"]))
    writer.add_key_length(int(hparams["qk_nope_head_dim"]) + int(hparams["qk_rope_head_dim"]))
    writer.add_value_length(int(hparams["v_head_dim"]))
    writer.add_rope_dimension_count(int(hparams["qk_rope_head_dim"]))
    writer.add_expert_feed_forward_length(int(hparams["moe_intermediate_size"]))
    writer.add_expert_shared_count(int(hparams.get("n_shared_experts") or 0))
    if (scale := hparams.get("routed_scaling_factor")) is not None:
        writer.add_expert_weights_scale(float(scale))
    if hparams.get("norm_topk_prob"):
        writer.add_expert_weights_norm(True)
    v3 = model_type == "deepseek_v3"
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if v3 else gguf.ExpertGatingFuncType.SOFTMAX)
    # V3 always limits routing to the best groups; V2 only with topk_method group_limited_greedy
    grouped = v3 or hparams.get("topk_method") == "group_limited_greedy"
    if grouped and (n_group := int(hparams.get("n_group") or 1)) > 1:
        writer.add_expert_group_count(n_group)
        writer.add_expert_group_used_count(int(hparams["topk_group"]))
    if (mscale_all_dim := _rope_parameters(hparams).get("mscale_all_dim")) is not None:
        writer.add_rope_scaling_yarn_log_mul(0.1 * float(mscale_all_dim))  # llama.cpp divides by 0.1 again


def _llama3_rope_factors(hparams: dict[str, Any]) -> torch.Tensor:
    """convert_hf_to_gguf.py's rope_freqs for Llama 3 RoPE scaling (one factor per rotated pair)."""
    rope = _rope_parameters(hparams)
    dim = _head_dim(hparams)
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


# --- tokenizer ---------------------------------------------------------------------------------------


def _add_tokenizer(writer: gguf.GGUFWriter, directory: Path, n_vocab: int) -> None:
    """The checkpoint's tokenizer: SentencePiece (tokenizer.model), or BPE from tokenizer.json; else none."""
    spm_file, json_file = directory / "tokenizer.model", directory / "tokenizer.json"
    if spm_file.is_file():
        pieces, add_dummy_prefix = _sentencepiece_model(spm_file)
        tokens, scores, types = _sentencepiece_vocab(pieces, json_file, n_vocab)
        _add_spm(writer, tokens, scores, types, directory)
        writer.add_add_space_prefix(add_dummy_prefix)
    elif json_file.is_file():
        tokenizer = json.loads(json_file.read_text(encoding="utf-8"))
        model = tokenizer.get("model") or {}
        if model.get("type") != "BPE":
            raise QuantkitError(f"{json_file}: GGUF export supports BPE and SentencePiece tokenizers, "
                                f"not {model.get('type')!r}")
        if model.get("byte_fallback"):  # a SentencePiece BPE model saved as tokenizer.json
            tokens, scores, types = _byte_fallback_vocab(tokenizer, n_vocab)
            _add_spm(writer, tokens, scores, types, directory)
            pre = tokenizer.get("pre_tokenizer") or {}
            if pre.get("type") == "Metaspace":
                writer.add_add_space_prefix(pre.get("prepend_scheme", "always") != "never")
        else:
            tokens, _, types = _bpe_vocab(tokenizer, n_vocab)
            writer.add_tokenizer_model("gpt2")
            writer.add_tokenizer_pre(_bpe_pre_tokenizer(tokenizer))
            writer.add_token_list(tokens)
            writer.add_token_types(types)
            gguf.SpecialVocab(directory, load_merges=True, n_vocab=n_vocab).add_to_gguf(writer, quiet=True)
    else:
        writer.add_tokenizer_model("none")  # llama.cpp then makes vocab_size dummy tokens


def _add_spm(writer: gguf.GGUFWriter, tokens: list[str], scores: list[float], types: list[int],
             directory: Path) -> None:
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    gguf.SpecialVocab(directory, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)


def _bpe_pre_tokenizer(tokenizer: dict[str, Any]) -> str:
    """``tokenizer.ggml.pre``: "gpt-2" for GPT-2's byte-level regex, else llama.cpp's generic "default"."""
    pre = tokenizer.get("pre_tokenizer") or {}
    gpt2 = pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not tokenizer.get("normalizer")
    return "gpt-2" if gpt2 else "default"


def _padded(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """convert_hf_to_gguf.py's filler for ids no token uses."""
    return [f"[PAD{i}]" for i in range(n_vocab)], [-10000.0] * n_vocab, [gguf.TokenType.UNUSED] * n_vocab


def _bpe_vocab(tokenizer: dict[str, Any], n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """Token texts (as stored in tokenizer.json) by id, with added tokens typed CONTROL/USER_DEFINED."""
    tokens, scores, types = _padded(n_vocab)
    for text, token_id in tokenizer["model"]["vocab"].items():
        _set_token(tokens, types, token_id, text, gguf.TokenType.NORMAL)
    for added in tokenizer.get("added_tokens") or []:
        kind = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        _set_token(tokens, types, int(added["id"]), added["content"], kind)
    return tokens, scores, types


def _byte_fallback_vocab(tokenizer: dict[str, Any], n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """SentencePiece-style vocab from a byte-fallback BPE tokenizer.json.

    llama.cpp's SentencePiece tokenizer merges the pair whose result scores highest. SentencePiece's
    BPE models list their normal pieces best first and score the n-th one ``-n``; the same is
    written here, so that llama.cpp merges in the order the tokenizer.json's BPE does.
    """
    tokens, scores, types = _bpe_vocab(tokenizer, n_vocab)
    rank = 0
    for i, text in enumerate(tokens):
        if types[i] == gguf.TokenType.UNUSED:
            continue
        scores[i] = 0.0
        if types[i] != gguf.TokenType.NORMAL:
            continue
        if len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            types[i] = gguf.TokenType.BYTE
        else:
            scores[i], rank = -float(rank), rank + 1
    return tokens, scores, types


def _set_token(tokens: list[str], types: list[int], token_id: int, text: str, kind: int) -> None:
    if token_id >= len(tokens):
        raise QuantkitError(f"tokenizer token {text!r} has id {token_id}, beyond the model's vocab_size {len(tokens)}")
    tokens[token_id], types[token_id] = text, kind


def _sentencepiece_vocab(pieces: list[tuple[str, float, int]], json_file: Path,
                         n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """SentencePiece pieces, scores and types padded to ``n_vocab``, plus tokenizer.json's added tokens."""
    tokens, scores, types = _padded(n_vocab)
    if len(pieces) > n_vocab:
        raise QuantkitError(f"tokenizer.model has {len(pieces)} pieces, more than the model's vocab_size {n_vocab}")
    for i, (piece, score, kind) in enumerate(pieces):
        tokens[i], scores[i], types[i] = piece, score, kind
    if json_file.is_file():
        for added in json.loads(json_file.read_text(encoding="utf-8")).get("added_tokens") or []:
            token_id = int(added["id"])
            if token_id < len(pieces) and tokens[token_id] == added["content"]:
                continue  # a piece of the model itself keeps its own type
            kind = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
            _set_token(tokens, types, token_id, added["content"], kind)
            scores[token_id] = -1000.0
    return tokens, scores, types


def _sentencepiece_model(spm_file: Path) -> tuple[list[tuple[str, float, int]], bool]:
    """(piece, score, type) of every piece and ``add_dummy_prefix`` from a serialized sentencepiece ModelProto.

    ModelProto field 1 holds the pieces (SentencePiece's piece types 1 normal .. 6 byte are
    gguf.TokenType's values), field 3 the normalizer spec (its field 3: add_dummy_prefix, default true).
    """
    pieces = []
    add_dummy_prefix = True
    try:
        for field, value in _proto_fields(spm_file.read_bytes()):
            if field == 1 and isinstance(value, bytes):
                piece, score, kind = "", 0.0, int(gguf.TokenType.NORMAL)
                for sub_field, sub_value in _proto_fields(value):
                    if sub_field == 1 and isinstance(sub_value, bytes):
                        piece = sub_value.decode("utf-8")
                    elif sub_field == 2 and isinstance(sub_value, bytes):
                        score = struct.unpack("<f", sub_value)[0]
                    elif sub_field == 3 and isinstance(sub_value, int):
                        kind = sub_value
                pieces.append((piece, score, kind))
            elif field == 3 and isinstance(value, bytes):
                add_dummy_prefix = all(bool(v) for f, v in _proto_fields(value) if f == 3)
    except (IndexError, ValueError, UnicodeDecodeError, struct.error):
        raise QuantkitError(f"{spm_file} is not a valid SentencePiece model") from None
    return pieces, add_dummy_prefix


def _proto_fields(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of a protobuf message: varints as int, everything else as raw bytes."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
            yield field, value
            continue
        if wire == 2:
            size, pos = _varint(data, pos)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
        else:
            raise ValueError(f"protobuf wire type {wire}")
        if pos + size > len(data):
            raise ValueError("truncated protobuf")
        yield field, data[pos : pos + size]
        pos += size


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos

