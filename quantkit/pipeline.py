"""The sequential layer-by-layer driver: one decoder layer in memory at a time.

The model is built on the ``meta`` device (no memory). :meth:`LayerPipeline.capture`
loads the embedding (and rebuilds the rotary embedding), runs every calibration window
up to the first decoder layer and keeps what that layer receives: the hidden states per
batch plus the keyword arguments (position embeddings, causal mask) the model passes.
Then, for each layer ``i``::

    layer = pipeline.load_layer(i)           # weights read from the checkpoint
    ... attach observers / quantize ...
    states = pipeline.run_layer(layer, states)   # layer i's outputs feed layer i+1
    pipeline.release(layer)                  # back to meta

Peak memory is one decoder layer plus the calibration activations ``[N, T, H]``.
Calibration and GPTQ share this module; it is the only place that knows the order.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from quantkit import heap
from quantkit.errors import QuantkitError
from quantkit.model.archs import get_arch
from quantkit.model.checkpoint import Checkpoint


@dataclass
class LayerStates:
    """What a decoder layer receives: hidden states per batch, and the model's other arguments."""

    hidden: list[torch.Tensor]  # [B, T, H] per batch
    kwargs: dict[int, dict[str, Any]] = field(default_factory=dict)  # batch size -> layer keyword arguments

    def batches(self) -> Iterator[tuple[torch.Tensor, dict[str, Any]]]:
        for hidden in self.hidden:
            yield hidden, self.kwargs[hidden.shape[0]]

    @property
    def tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)


class _Captured(Exception):  # control flow only: never escapes capture()
    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.args_, self.kwargs = args, kwargs


class LayerPipeline:
    """A checkpoint's model on the meta device whose parts are loaded from disk one at a time."""

    def __init__(self, checkpoint: Checkpoint, dtype: torch.dtype = torch.float32, device: str = "cpu") -> None:
        import transformers  # deferred: transformers takes seconds to import

        self.checkpoint = checkpoint
        self.arch = get_arch(checkpoint.model_type)
        self.dtype, self.device = dtype, device
        transformers.logging.set_verbosity_error()
        config = transformers.AutoConfig.for_model(
            **{k: v for k, v in checkpoint.config.items() if k != "quantization_config"}
        )
        with contextlib.redirect_stderr(io.StringIO()), torch.device("meta"):
            self.model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
        self.config = self.model.config
        self.decoder = self.model.get_decoder()
        self.decoder_prefix = _prefix_of(self.model, self.decoder)
        self.layers: nn.ModuleList = self.decoder.layers

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def layer_prefix(self, index: int) -> str:
        return f"{self.decoder_prefix}layers.{index}"

    def load(self, prefix: str) -> nn.Module:
        """Materialize the submodule at ``prefix`` with its weights from the checkpoint."""
        module = self.model.get_submodule(prefix)
        module.to_empty(device=self.device)
        wanted = module.state_dict()  # detached views of the module's own (uninitialized) storage
        for key, target in wanted.items():
            self._fill(f"{prefix}.{key}", target)
        persistent = set(wanted)
        stale = [n for n, _ in module.named_buffers() if n not in persistent]
        if stale:
            raise QuantkitError(f"{prefix} has buffers the checkpoint cannot provide ({stale[0]}); not supported yet")
        return module

    def load_layer(self, index: int) -> nn.Module:
        return self.load(self.layer_prefix(index))

    @staticmethod
    def release(module: nn.Module) -> None:
        """Return a loaded module's memory (its parameters go back to the meta device) to the system."""
        module.to("meta")
        heap.trim()

    def capture(self, input_ids: torch.Tensor, batch_size: int) -> LayerStates:
        """Inputs of the first decoder layer for windows ``input_ids`` [N, T], batch by batch."""
        loaded = self._load_stem()
        states = LayerStates(hidden=[])
        handle = self.layers[0].register_forward_pre_hook(_raise_captured, with_kwargs=True)
        try:
            with torch.no_grad():
                for batch in input_ids.split(batch_size):
                    try:
                        self.decoder(input_ids=batch.to(self.device), use_cache=False)
                    except _Captured as captured:
                        hidden = captured.args_[0] if captured.args_ else captured.kwargs.pop("hidden_states")
                        states.hidden.append(hidden)
                        states.kwargs.setdefault(batch.shape[0], captured.kwargs)
                    else:
                        raise RuntimeError("the model never reached its first decoder layer")
        finally:
            handle.remove()
            for module in loaded:
                self.release(module)
        return states

    def run_layer(self, layer: nn.Module, states: LayerStates, on_batch: Any = None) -> LayerStates:
        """``layer`` applied to every batch of ``states``; ``on_batch()`` is called before each batch."""
        out: list[torch.Tensor] = []
        with torch.no_grad():
            for hidden, kwargs in states.batches():
                if on_batch is not None:
                    on_batch()
                result = layer(hidden, **kwargs)
                out.append(result[0] if isinstance(result, tuple) else result)
        return LayerStates(out, states.kwargs)

    def output_head_name(self) -> str | None:
        """In-memory name of the output projection (``lm_head``), if the model has one."""
        head = self.model.get_output_embeddings()
        return _prefix_of(self.model, head).rstrip(".") if head is not None else None

    def final_norm(self, states: LayerStates) -> list[torch.Tensor]:
        """The final norm applied to the last layer's outputs: what ``lm_head`` receives."""
        norm = self.load(f"{self.decoder_prefix}norm")
        try:
            with torch.no_grad():
                return [norm(h) for h in states.hidden]
        finally:
            self.release(norm)

    def _load_stem(self) -> list[nn.Module]:
        """Everything the decoder runs before its first layer: loaded, or rebuilt when it has no weights."""
        loaded = []
        for name, child in self.decoder.named_children():
            if name in ("layers", "norm"):
                continue
            if child.state_dict():
                loaded.append(self.load(f"{self.decoder_prefix}{name}"))
            else:  # e.g. the rotary embedding: buffers computed from the config
                with torch.device(self.device):
                    rebuilt = type(child)(config=self.config)
                setattr(self.decoder, name, rebuilt)
        return loaded

    def _fill(self, memory_name: str, target: torch.Tensor) -> None:
        """Copy the on-disk tensor(s) of ``memory_name`` into ``target``, converting the dtype on the way.

        One source tensor at a time and straight into the loaded parameter: no stacked or converted copy
        of a whole layer (fusing a Qwen3-30B-A3B layer's experts and converting them first took 6.2 GB for
        a 2.5 GB float32 layer; docs/scaling.md).
        """
        disk_name = self.arch.disk_name(memory_name)
        if disk_name in self.checkpoint:
            parts = {disk_name: target}
        elif self.arch.is_fused(memory_name) and self.arch.experts is not None:
            parts = self.arch.experts.split_fused(disk_name, target)  # per-expert views of target
        elif memory_name.endswith("lm_head.weight") and getattr(self.config, "tie_word_embeddings", False):
            parts = {self.arch.disk_name(self._embedding_name()): target}
        else:
            raise QuantkitError(f"{self.checkpoint.path} lacks {disk_name}")
        for name, view in parts.items():
            if name not in self.checkpoint:
                raise QuantkitError(f"{self.checkpoint.path} lacks {name}")
            source = self.checkpoint.get(name)
            if source.shape != view.shape:
                raise QuantkitError(f"{name} in {self.checkpoint.path} has shape {list(source.shape)}; "
                                    f"the config implies {list(view.shape)}")
            view.copy_(source)

    def _embedding_name(self) -> str:
        embeddings = self.model.get_input_embeddings()
        return f"{_prefix_of(self.model, embeddings).rstrip('.')}.weight"


def _raise_captured(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    raise _Captured(args, kwargs)


def _prefix_of(root: nn.Module, target: nn.Module) -> str:
    """``"model."`` for ``root.model``: the dotted path of ``target`` inside ``root`` plus a dot."""
    for name, module in root.named_modules():
        if module is target:
            return f"{name}." if name else ""
    raise RuntimeError("module not found in the model")
