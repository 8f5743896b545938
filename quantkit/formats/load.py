"""quantkit's loader: a float transformers model with dequantized weights, for evaluation."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import torch

from quantkit.errors import QuantkitError
from quantkit.formats import compressed_tensors, ggml_blocks, gptq_v1
from quantkit.formats.gguf.config import hf_config, open_gguf
from quantkit.formats.gguf.read import gguf_state, rope_factors
from quantkit.jsonfile import read_json_object
from quantkit.model.archs import get_arch
from quantkit.model.checkpoint import Checkpoint
from quantkit.model.experts import ExpertTap, install_eager_experts
from quantkit.schemes.activations import fake_quantize_dynamic, fake_quantize_static


def dequantized_state(checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
    """On-disk names -> float tensors, with every quantized module's weight dequantized.

    Reads compressed-tensors ``pack-quantized`` and GPTQ (``quant_method: "gptq"``, v1 or v2)
    checkpoints; a GPTQ config may also come from ``quantize_config.json`` alone.
    """
    gptq_config = _gptq_config(checkpoint)
    if gptq_config is not None:
        return _dequantized_gptq_state(checkpoint, gptq_config)
    quant_config = checkpoint.config.get("quantization_config")
    if quant_config is not None and ggml_blocks.is_ggml_blocks(quant_config):
        return _dequantized_block_state(checkpoint, quant_config)
    groups = compressed_tensors.module_args(quant_config) if quant_config else []
    modules = {n.removesuffix(".weight_packed") for n in checkpoint.tensors if n.endswith(".weight_packed")}
    state = _unquantized_tensors(checkpoint, modules, compressed_tensors.SUFFIXES)
    for module in sorted(modules):
        parts = {s: checkpoint.get(f"{module}.{s}") for s in compressed_tensors.SUFFIXES
                 if f"{module}.{s}" in checkpoint}
        state[f"{module}.weight"] = compressed_tensors.decode(parts, compressed_tensors.args_for(module, groups))
    return state


def _unquantized_tensors(
    checkpoint: Checkpoint, modules: set[str], suffixes: tuple[str, ...]
) -> dict[str, torch.Tensor]:
    """Every tensor except the quantized modules' format tensors (``<module>.<suffix>``), as stored."""
    state: dict[str, torch.Tensor] = {}
    for name in checkpoint.tensors:
        module, _, suffix = name.rpartition(".")
        if not (module in modules and suffix in suffixes):
            state[name] = checkpoint.get(name)
    return state


def _gptq_config(checkpoint: Checkpoint) -> dict[str, Any] | None:
    """The GPTQ quantization config of ``checkpoint``, or None when it is not a GPTQ checkpoint."""
    quant_config = checkpoint.config.get("quantization_config")
    if quant_config:
        return quant_config if quant_config.get("quant_method") == gptq_v1.QUANT_METHOD else None
    file = checkpoint.path / gptq_v1.QUANTIZE_CONFIG_FILE
    if file.is_file() and any(n.endswith(".qweight") for n in checkpoint.tensors):
        file_config = read_json_object(file)  # AutoGPTQ's older files have no quant_method
        return file_config if file_config.get("quant_method", gptq_v1.QUANT_METHOD) == gptq_v1.QUANT_METHOD else None
    return None


def _dequantized_gptq_state(checkpoint: Checkpoint, quant_config: dict[str, Any]) -> dict[str, torch.Tensor]:
    fmt = gptq_v1.checkpoint_format(quant_config)
    modules = {n.removesuffix(".qweight") for n in checkpoint.tensors if n.endswith(".qweight")}
    state = _unquantized_tensors(checkpoint, modules, gptq_v1.SUFFIXES)
    for module in sorted(modules):
        args = gptq_v1.module_args(quant_config, module)
        if args is None:
            raise QuantkitError(f"{checkpoint.path}: {module} has GPTQ tensors but the config's dynamic skips it")
        parts = {s: checkpoint.get(f"{module}.{s}") for s in gptq_v1.SUFFIXES if f"{module}.{s}" in checkpoint}
        state[f"{module}.weight"] = gptq_v1.decode(parts, int(args["bits"]), fmt)
    return state


def _dequantized_block_state(checkpoint: Checkpoint, quant_config: dict[str, Any]) -> dict[str, torch.Tensor]:
    suffix = f".{ggml_blocks.SUFFIX}"
    modules = {n.removesuffix(suffix) for n in checkpoint.tensors if n.endswith(suffix)}
    state = _unquantized_tensors(checkpoint, modules, (ggml_blocks.SUFFIX,))
    for module in sorted(modules):
        state[f"{module}.weight"] = ggml_blocks.decode_weight(module, checkpoint.get(module + suffix), quant_config)
    return state


def load_quantized(path: str | Path, dtype: torch.dtype | None = None, device: str = "cpu") -> Any:
    """Load a quantkit output (or any float checkpoint) as a float ``transformers`` model.

    Weights are dequantized exactly as compressed-tensors does (GPTQ checkpoints: as AutoGPTQ's
    reference dequantization, in fp16), then cast to ``dtype`` (default: the checkpoint's
    ``dtype``/``torch_dtype``). A GGUF file is read by :func:`load_gguf` (default dtype float32).
    """
    if Path(path).is_file():
        return load_gguf(Path(path), dtype or torch.float32, device)
    checkpoint = Checkpoint.open(path)
    arch = get_arch(checkpoint.model_type)
    config_dict = {k: v for k, v in checkpoint.config.items() if k != "quantization_config"}
    if dtype is None:
        dtype = _config_dtype(config_dict)
    model = _empty_model(config_dict, dtype)
    _assign_weights(model, arch.to_memory_state(dequantized_state(checkpoint)), dtype, checkpoint.path)
    simulate_input_quantization(model, checkpoint)
    return model.to(device).eval()


def load_gguf(path: Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Any:
    """A GGUF file (of an architecture quantkit exports) as a float ``transformers`` model.

    The config is rebuilt from the metadata (:mod:`quantkit.formats.gguf.config`), every tensor
    dequantized by the gguf package and put back under its Hugging Face name (:mod:`quantkit.formats.gguf.read`).
    """
    reader = open_gguf(path)
    config_dict = hf_config(reader, path)
    arch = get_arch(config_dict["model_type"])
    model = _empty_model(config_dict, dtype)
    disk_shapes = arch.disk_shapes({name: tuple(t.shape) for name, t in model.state_dict().items()})
    _assign_weights(model, arch.to_memory_state(gguf_state(reader, arch, config_dict, disk_shapes, path)), dtype, path)
    factors = rope_factors(reader, path)
    if factors is not None:  # llama.cpp divides each RoPE frequency by its factor
        for module in model.modules():
            if isinstance(getattr(module, "inv_freq", None), torch.Tensor) and module.inv_freq.shape == factors.shape:
                module.inv_freq = module.inv_freq / factors
                module.original_inv_freq = module.inv_freq
    return model.to(device).eval()


def _empty_model(config_dict: dict[str, Any], dtype: torch.dtype) -> Any:
    """The transformers model of ``config_dict`` (with its ``model_type``), weights left uninitialised."""
    import transformers  # deferred: transformers takes seconds to import
    from transformers.initialization import no_init_weights

    config = transformers.AutoConfig.for_model(**config_dict)
    with contextlib.redirect_stderr(io.StringIO()), no_init_weights():  # every weight is assigned afterwards
        return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)


def _assign_weights(model: Any, state: dict[str, torch.Tensor], dtype: torch.dtype, source: Path) -> None:
    """Make the tensors of ``state`` (in-memory names) the model's parameters; every weight must be there."""
    # assign: the parameters become the loaded tensors; the uninitialised ones are never touched (never resident)
    result = model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
    missing = [k for k in result.missing_keys if not _is_tied(model, k)]
    if missing:
        raise QuantkitError(f"{source} lacks {len(missing)} weight(s) the model needs, e.g. {missing[0]}")
    if result.unexpected_keys:
        unknown = result.unexpected_keys[0]
        raise QuantkitError(f"{source} has weight(s) the model does not know, e.g. {unknown}")
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()


def simulate_input_quantization(model: Any, checkpoint: Checkpoint) -> int:
    """Fake-quantize the inputs of modules whose config group quantizes activations; returns how many.

    Plain linears get a forward pre-hook; routed experts (fused in memory) run quantkit's eager
    experts forward, which quantizes each expert's inputs with that expert's own scale.
    """
    quant_config = checkpoint.config.get("quantization_config")
    if not quant_config or quant_config.get("quant_method") in (gptq_v1.QUANT_METHOD, ggml_blocks.QUANT_METHOD):
        return 0
    arch = get_arch(checkpoint.model_type)
    groups = compressed_tensors.module_args(quant_config)
    per_expert: dict[str, dict[str, dict[int, torch.Tensor | None]]] = {}
    count = 0
    for module in sorted({n.removesuffix(".weight_packed") for n in checkpoint.tensors if n.endswith("_packed")}):
        inputs = compressed_tensors.args_for(module, groups, "input_activations")
        if not inputs:
            continue
        scale = checkpoint.get(f"{module}.input_scale") if not inputs.get("dynamic") else None
        if not inputs.get("dynamic") and scale is None:
            raise QuantkitError(f"{checkpoint.path} lacks {module}.input_scale for static activations")
        site, expert = arch.input_site(f"{module}.weight")
        if arch.is_fused(site):
            experts_module, _, param = site.rpartition(".")
            per_expert.setdefault(experts_module, {}).setdefault(param, {})[expert] = scale
        else:
            model.get_submodule(site).register_forward_pre_hook(_input_quantizer(scale))
        count += 1
    for name, scales in per_expert.items():
        install_eager_experts(model.get_submodule(name), _expert_input_quantizer(scales))
    return count


def _input_quantizer(scale: torch.Tensor | None):  # -> forward pre-hook
    def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        x = fake_quantize_dynamic(args[0]) if scale is None else fake_quantize_static(args[0], scale)
        return (x, *args[1:])

    return hook


def _expert_input_quantizer(scales: dict[str, dict[int, torch.Tensor | None]]) -> ExpertTap:
    def tap(param: str, expert: int, x: torch.Tensor) -> torch.Tensor | None:
        if expert not in scales.get(param, {}):
            return None
        scale = scales[param][expert]
        return fake_quantize_dynamic(x) if scale is None else fake_quantize_static(x, scale)

    return tap


def _config_dtype(config: dict[str, Any]) -> torch.dtype:
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name), None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def _is_tied(model: Any, key: str) -> bool:
    return key == "lm_head.weight" and bool(getattr(model.config, "tie_word_embeddings", False))
