"""A Hugging Face config rebuilt from a GGUF's metadata: :mod:`.hparams` read backwards.

The model type is the exportable architecture whose llama.cpp architecture, experts and gating function
match the file (``llama`` with experts is Mixtral; ``deepseek2`` with sigmoid gating is DeepSeek-V3). The
keys every architecture has, then the ones its ``GgufExport`` declares, are read back into the config
keys they were written from: a key written as a sum (``key_length`` = nope + rope head dims) gives the one
summand not known otherwise. What llama.cpp's graph always does (its ``Refusal`` values: no top-k
renormalisation in qwen2moe, interleaved RoPE in DeepSeek-V3), silu activations and the defaults of the
transformers config class stand in for what GGUF does not record. GGUF has no YaRN ``mscale``: llama.cpp's
deepseek2 graph behaves as ``mscale = mscale_all_dim``, which is what is rebuilt. Llama 3 RoPE scaling is
stored only as the ``rope_freqs`` factors; the loader divides the model's RoPE frequencies by them.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from quantkit.errors import QuantkitError
from quantkit.formats.gguf.hparams import exportable
from quantkit.formats.gguf.scan import check_gguf
from quantkit.model.archs import ARCHS, ArchSpec
from quantkit.model.gguf_spec import GgufExport

_ROPE_SCALING = {"rope_scaling_factor": "factor", "rope_scaling_orig_ctx_len": "original_max_position_embeddings",
                 "rope_scaling_yarn_ext_factor": "extrapolation_factor",
                 "rope_scaling_yarn_attn_factor": "attention_factor",
                 "rope_scaling_yarn_beta_fast": "beta_fast", "rope_scaling_yarn_beta_slow": "beta_slow"}


def open_gguf(path: Path) -> gguf.GGUFReader:
    """``gguf.GGUFReader`` of ``path`` once :func:`check_gguf` found every count within the file."""
    check_gguf(path)
    try:
        return gguf.GGUFReader(path)
    except (ValueError, KeyError, IndexError, UnicodeDecodeError, OverflowError) as exc:
        raise QuantkitError(f"{path}: unreadable GGUF: {exc}") from None


@lru_cache(maxsize=256)
def _key_name(arch: str, method: str) -> str:
    """The metadata key ``GGUFWriter.add_<method>`` writes for ``arch`` (asked of the writer itself)."""
    writer = gguf.GGUFWriter(None, arch)
    before = set(writer.kv_data[0])
    getattr(writer, f"add_{method}")(gguf.RopeScalingType.NONE if method == "rope_scaling_type" else 1)
    (key,) = set(writer.kv_data[0]) - before
    return key


class GgufMetadata:
    """The scalar and string metadata of a GGUF, looked up by the ``GGUFWriter.add_*`` method that writes them."""

    def __init__(self, reader: gguf.GGUFReader, path: Path) -> None:
        self.path = path
        self.values: dict[str, Any] = {name: _value(field) for name, field in reader.fields.items()
                                       if field.types and field.types[0] != gguf.GGUFValueType.ARRAY}
        self.arch = str(self.values.get("general.architecture", ""))

    def get(self, method: str) -> Any:
        return self.values.get(_key_name(self.arch, method))

    def need(self, method: str) -> Any:
        value = self.get(method)
        if value is None:
            raise QuantkitError(f"{self.path} lacks {_key_name(self.arch, method)}, which a "
                                f"{self.arch} model needs")
        return value


def _value(field: Any) -> Any:
    value = field.contents()
    if field.types[0] == gguf.GGUFValueType.FLOAT32:
        return float(str(np.float32(value)))  # the shortest decimal of the float32 written (1e-06, not 9.99e-07)
    return value


def hf_config(reader: gguf.GGUFReader, path: Path) -> dict[str, Any]:
    """config.json of the model a GGUF holds (with ``model_type``), for transformers' ``AutoConfig.for_model``."""
    meta = GgufMetadata(reader, path)
    spec = _model_type(meta, path)
    assert spec.gguf is not None and spec.gguf.export is not None
    export = spec.gguf.export
    names = {tensor.name for tensor in reader.tensors}
    config: dict[str, Any] = {
        "num_hidden_layers": int(meta.need("block_count")),
        "max_position_embeddings": int(meta.need("context_length")),
        "hidden_size": int(meta.need("embedding_length")),
        "intermediate_size": int(meta.need("feed_forward_length")),
        "num_attention_heads": int(meta.need("head_count")),
        "rms_norm_eps": float(meta.need("layer_norm_rms_eps")),
        "vocab_size": int(meta.get("vocab_size") or _embedding_rows(reader, path)),
        "rope_parameters": _rope(meta),
        "tie_word_embeddings": "output.weight" not in names,
        "hidden_act": "silu",
        "dtype": "float32",
    }
    config["num_key_value_heads"] = config[export.head_count_kv] = int(meta.need("head_count_kv"))
    if spec.experts is not None:
        config[spec.num_experts_keys[0]] = int(meta.need("expert_count"))
        config["num_experts_per_tok"] = int(meta.need("expert_used_count"))
    _export_keys(config, meta, export)
    _routing(config, meta, export)
    for refusal in export.refusals:  # what llama.cpp's graph does, whatever the original config said
        config[refusal.key] = refusal.ok
    _biases(config, spec.model_type, names)
    for token, stored in (("bos", "bos"), ("eos", "eos"), ("pad", "padding")):
        if (token_id := meta.values.get(f"tokenizer.ggml.{stored}_token_id")) is not None:
            config[f"{token}_token_id"] = int(token_id)
    return {"model_type": spec.model_type, **config}


def _model_type(meta: GgufMetadata, path: Path) -> ArchSpec:
    """The exportable architecture that matches the file's llama.cpp architecture, experts and gating."""
    has_experts = bool(meta.values.get(f"{meta.arch}.expert_count"))
    gating = meta.values.get(f"{meta.arch}.expert_gating_func")
    specs = [ARCHS.get(model_type) for model_type in exportable()]
    matches = []
    for spec in specs:
        assert spec.gguf is not None and spec.gguf.export is not None
        wanted = spec.gguf.export.gating_func
        if spec.gguf.arch == meta.arch and (spec.experts is not None) == has_experts and (
                wanted is None or gating is None or int(gguf.ExpertGatingFuncType[wanted]) == gating):
            matches.append(spec)
    if len(matches) != 1:
        arches = sorted({spec.gguf.arch for spec in specs if spec.gguf is not None})
        found = repr(meta.arch) + (" with these experts and gating" if meta.arch in arches else "")
        raise QuantkitError(f"{path}: quantkit reads the GGUF architectures it exports ({', '.join(arches)}), "
                            f"not {found if meta.arch else 'a file without general.architecture'}")
    return matches[0]


def _embedding_rows(reader: gguf.GGUFReader, path: Path) -> int:
    for tensor in reader.tensors:
        if tensor.name == "token_embd.weight":
            return int(tensor.shape[-1])
    raise QuantkitError(f"{path} has no token_embd.weight")


def _rope(meta: GgufMetadata) -> dict[str, Any]:
    rope: dict[str, Any] = {"rope_theta": float(meta.get("rope_freq_base") or 10000.0), "rope_type": "default"}
    kind = meta.get("rope_scaling_type")
    if kind in (None, "none"):
        return rope
    if kind not in ("linear", "yarn"):
        raise QuantkitError(f"{meta.path}: RoPE scaling {kind!r} is not supported (linear and yarn are)")
    rope["rope_type"] = kind
    for method, key in _ROPE_SCALING.items():
        if (value := meta.get(method)) is not None:
            rope[key] = value
    if (log_mul := meta.get("rope_scaling_yarn_log_mul")) is not None:
        rope["mscale_all_dim"] = rope["mscale"] = float(str(np.float32(log_mul / 0.1)))  # hparams.py wrote 0.1 x
    return rope


def _export_keys(config: dict[str, Any], meta: GgufMetadata, export: GgufExport) -> None:
    """The architecture's keys back into their config keys; a sum gives the one summand not known otherwise."""
    sums = []
    for key in export.keys:
        value, first = meta.get(key.key), key.sources[0]
        if key.kind == "flag":
            config[first] = bool(value)
        elif key.kind == "float":
            if value is not None:
                config[first] = value
        elif value is None:
            if key.default is None:
                meta.need(key.key)
            config[first] = None if key.zero_means_none else key.default
        elif key.zero_means_none and value == 0:
            config[first] = None
        else:
            sums.append((key.sources, int(value)))
    for _ in range(len(sums)):  # each pass settles at least one sum, or none is left to settle
        for sources, total in sums:
            unknown = [s for s in sources if s not in config]
            if len(unknown) == 1:
                config[unknown[0]] = total - sum(int(config[s]) for s in sources if s != unknown[0])
    for sources, total in sums:
        if any(s not in config for s in sources) or sum(int(config[s]) for s in sources) != total:
            raise QuantkitError(f"{meta.path}: inconsistent metadata for {' + '.join(sources)} (= {total})")


def _routing(config: dict[str, Any], meta: GgufMetadata, export: GgufExport) -> None:
    """Group-limited routing: the groups the file names, else one group (routing over all experts)."""
    if export.group_routing is None:
        return
    groups = meta.get("expert_group_count")
    config["n_group"] = int(groups or 1)
    config["topk_group"] = int(meta.get("expert_group_used_count") or 1)
    if groups and export.group_routing.only_if is not None:
        key, value = export.group_routing.only_if
        config[key] = value


def _biases(config: dict[str, Any], model_type: str, names: set[str]) -> None:
    """Attention and MLP biases where the config class has a switch for them and the file holds them."""
    import transformers  # deferred: heavy; only its config defaults are read here

    defaults = transformers.AutoConfig.for_model(model_type).to_dict()
    has = {kind: any(n.endswith(f".{kind}.bias") for n in names) for kind in ("attn_q", "ffn_up", "ffn_gate")}
    for key in ("attention_bias", "qkv_bias"):
        if key in defaults:
            config[key] = has["attn_q"]
    if "mlp_bias" in defaults:
        config["mlp_bias"] = has["ffn_up"] or has["ffn_gate"]
