"""ArchSpec: where the parts of a model family live, as data (no per-family code paths).

Names here are checkpoint (on-disk) names such as
``model.layers.3.mlp.experts.7.gate_proj.weight``. Transformers 5 holds routed experts in
memory as fused 3-D parameters (``mlp.experts.gate_up_proj`` [E, 2I, H] and
``mlp.experts.down_proj`` [E, H, I]); :class:`ExpertLayout` converts between both views.
"""

from __future__ import annotations

import re
from collections.abc import Container
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch

from quantkit.model.gguf_spec import GgufSpec


class Role(str, Enum):
    """What a tensor is for; recipes address roles as ``role:<value>``."""

    EMBEDDING = "embedding"
    LM_HEAD = "lm_head"
    NORM = "norm"
    ROUTER = "router"
    ATTENTION = "attention"
    DENSE_MLP = "dense_mlp"
    SHARED_EXPERT = "shared_expert"
    ROUTED_EXPERT = "routed_expert"
    OTHER = "other"


# Roles whose 2-D weights a recipe may quantize. Routers, norms and embeddings always stay float.
QUANTIZABLE_ROLES = frozenset(
    {Role.ATTENTION, Role.DENSE_MLP, Role.SHARED_EXPERT, Role.ROUTED_EXPERT, Role.LM_HEAD}
)
# Roles whose weights belong to linear layers; those left in float are listed in ``ignore``.
LINEAR_ROLES = QUANTIZABLE_ROLES | {Role.ROUTER}


@dataclass(frozen=True)
class ExpertLayout:
    """How one family names its routed experts on disk and in transformers' memory."""

    disk_block: str = "mlp"  # ``model.layers.N.<disk_block>.experts.E.<proj>.weight``
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    memory_block: str = "mlp"  # ``model.layers.N.<memory_block>.experts.gate_up_proj``

    @property
    def fused_pattern(self) -> re.Pattern[str]:
        blocks = "|".join(sorted({re.escape(self.disk_block), re.escape(self.memory_block)}))
        return re.compile(rf"^(?P<layer>.*\.)(?:{blocks})\.experts\.(?P<proj>gate_up_proj|down_proj)$")

    @property
    def per_expert_pattern(self) -> re.Pattern[str]:
        projs = "|".join(re.escape(p) for p in (self.gate, self.up, self.down))
        return re.compile(
            rf"^(?P<layer>.*\.){re.escape(self.disk_block)}\.experts\.(?P<expert>\d+)\.(?P<proj>{projs})\.weight$"
        )

    def expert_name(self, layer_prefix: str, expert: int, proj: str) -> str:
        """On-disk name of one expert projection; ``proj`` is gate, up or down."""
        disk_proj = {"gate": self.gate, "up": self.up, "down": self.down}[proj]
        return f"{layer_prefix}{self.disk_block}.experts.{expert}.{disk_proj}.weight"

    def stacked_name(self, per_expert_name: str) -> tuple[str, int] | None:
        """The name of the stack of all experts a per-expert weight belongs to, and its expert index (None for any
        other name): ``...<disk_block>.experts.7.<proj>.weight`` -> (``...<disk_block>.experts.<proj>.weight``, 7),
        as llama.cpp's convert_hf_to_gguf.py names merged experts before its GGUF name lookup."""
        match = self.per_expert_pattern.match(per_expert_name)
        if match is None:
            return None
        return f"{match['layer']}{self.disk_block}.experts.{match['proj']}.weight", int(match["expert"])

    def fused_sources(self, per_expert_name: str) -> list[str]:
        """The fused parameters that can hold the per-expert weight ``per_expert_name``: the on-disk block's name,
        then transformers' in-memory one (checkpoints saved from memory use it); [] for any other name."""
        match = self.per_expert_pattern.match(per_expert_name)
        if match is None:
            return []
        param = "down_proj" if match["proj"] == self.down else "gate_up_proj"
        return [f"{match['layer']}{block}.experts.{param}" for block in dict.fromkeys((self.disk_block,
                                                                                      self.memory_block))]

    def split_fused(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-expert on-disk tensors from one fused parameter (views, no copies)."""
        match = self.fused_pattern.match(name)
        if match is None:
            raise ValueError(f"{name} is not a fused expert parameter")
        layer = match["layer"]
        if match["proj"] == "down_proj":  # [E, H, I]
            return {self.expert_name(layer, e, "down"): tensor[e] for e in range(tensor.shape[0])}
        inter = tensor.shape[1] // 2  # [E, 2I, H]: gate rows first, then up rows
        out: dict[str, torch.Tensor] = {}
        for e in range(tensor.shape[0]):
            out[self.expert_name(layer, e, "gate")] = tensor[e, :inter]
            out[self.expert_name(layer, e, "up")] = tensor[e, inter:]
        return out

    def fused_shapes(self, name: str, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        """Per-expert on-disk names and shapes that a fused parameter of ``shape`` stands for."""
        return {k: tuple(v.shape) for k, v in self.split_fused(name, torch.empty(shape, device="meta")).items()}

    def fuse(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Transformers' in-memory state dict from on-disk names: per-expert tensors are stacked."""
        pattern = self.per_expert_pattern
        by_layer: dict[str, dict[tuple[int, str], torch.Tensor]] = {}
        out: dict[str, torch.Tensor] = {}
        for name, tensor in tensors.items():
            match = pattern.match(name)
            if match is None:
                out[name] = tensor
                continue
            by_layer.setdefault(match["layer"], {})[(int(match["expert"]), match["proj"])] = tensor
        for layer, parts in by_layer.items():
            n_experts = 1 + max(e for e, _ in parts)
            try:
                gate_up = [torch.cat([parts[(e, self.gate)], parts[(e, self.up)]]) for e in range(n_experts)]
                down = [parts[(e, self.down)] for e in range(n_experts)]
            except KeyError as missing:
                raise ValueError(f"{layer}{self.disk_block}.experts is missing {missing}") from None
            prefix = f"{layer}{self.memory_block}.experts"
            out[f"{prefix}.gate_up_proj"] = torch.stack(gate_up)
            out[f"{prefix}.down_proj"] = torch.stack(down)
        return out


@dataclass(frozen=True)
class ArchSpec:
    """Everything quantkit needs to know about one model family, as data."""

    model_type: str
    description: str
    experts: ExpertLayout | None = None
    router_patterns: tuple[str, ...] = ()  # regexes (searched) for router/gate tensors
    shared_expert_patterns: tuple[str, ...] = ()
    num_experts_keys: tuple[str, ...] = ()  # config keys for the routed-expert count, first present wins
    shared_experts_key: str | None = None  # a count, or a size for single-shared-expert families
    dense_layers: str = "none"  # "first_k_dense_replace" | "decoder_sparse_step" | "none"
    extra_config_keys: tuple[str, ...] = field(default=())  # shown by ``inspect``
    disk_renames: tuple[tuple[str, str], ...] = ()  # (on-disk fragment, in-memory fragment)
    gguf: GgufSpec | None = None  # llama.cpp's architecture and how GGUF export writes it (model/gguf_spec.py)

    def memory_name(self, disk_name: str) -> str:
        for disk, memory in self.disk_renames:
            disk_name = disk_name.replace(disk, memory)
        return disk_name

    def disk_name(self, memory_name: str) -> str:
        for disk, memory in self.disk_renames:
            memory_name = memory_name.replace(memory, disk)
        return memory_name

    def per_expert_view(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """On-disk per-expert tensors for ``name``: itself, or the experts of a fused parameter."""
        if self.experts is not None and self.is_fused(name):
            return self.experts.split_fused(name, tensor)
        return {name: tensor}

    def stored_in(self, name: str, stored: Container[str]) -> str:
        """The checkpoint tensor (of those ``stored``) that holds the on-disk weight ``name``: itself, or the fused
        experts parameter holding this expert's slice."""
        if name in stored or self.experts is None:
            return name
        return next((s for s in self.experts.fused_sources(name) if s in stored), name)

    def to_memory_state(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Transformers 5's in-memory state dict from on-disk (per-expert) tensors."""
        fused = self.experts.fuse(tensors) if self.experts is not None else tensors
        return {self.memory_name(name): t for name, t in fused.items()}

    def disk_shapes(self, memory_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """On-disk per-expert names and shapes expected from a model's in-memory parameter shapes."""
        out: dict[str, tuple[int, ...]] = {}
        for name, shape in memory_shapes.items():
            if self.experts is not None and self.is_fused(name):
                out.update(self.experts.fused_shapes(self.disk_name(name), shape))
            else:
                out[self.disk_name(name)] = shape
        return out

    def role(self, name: str) -> Role:
        """The role of an on-disk (or fused in-memory) tensor name."""
        if any(re.search(p, name) for p in self.router_patterns):
            return Role.ROUTER
        if "embed_tokens" in name or name.endswith("wte.weight"):
            return Role.EMBEDDING
        if name.startswith("lm_head") or name.endswith(".lm_head.weight"):
            return Role.LM_HEAD
        if re.search(r"norm(\.|$)|norm\.weight$|layernorm", name):
            return Role.NORM
        if any(re.search(p, name) for p in self.shared_expert_patterns):
            return Role.SHARED_EXPERT
        if self.experts is not None and (
            self.experts.per_expert_pattern.match(name) or self.experts.fused_pattern.match(name)
        ):
            return Role.ROUTED_EXPERT
        if re.search(r"\.(self_attn|attention|attn)\.", name):
            return Role.ATTENTION
        if re.search(r"\.(mlp|feed_forward|ffn)\.", name):
            return Role.DENSE_MLP
        return Role.OTHER

    def input_site(self, disk_weight: str) -> tuple[str, int]:
        """The calibration site (in-memory module or fused expert parameter) and expert index of a weight.

        ``model.layers.1.mlp.experts.3.up_proj.weight`` -> ``("model.layers.1.mlp.experts.gate_up_proj", 3)``;
        ``model.layers.0.self_attn.q_proj.weight`` -> ``("model.layers.0.self_attn.q_proj", 0)``.
        """
        match = self.experts.per_expert_pattern.match(disk_weight) if self.experts is not None else None
        if match is None or self.experts is None:
            return self.memory_name(disk_weight).removesuffix(".weight"), 0
        param = "down_proj" if match["proj"] == self.experts.down else "gate_up_proj"
        return self.memory_name(f"{match['layer']}{self.experts.memory_block}.experts.{param}"), int(match["expert"])

    def is_fused(self, name: str) -> bool:
        return self.experts is not None and self.experts.fused_pattern.match(name) is not None

    def num_layers(self, config: dict[str, Any]) -> int:
        return int(config.get("num_hidden_layers", 0))

    def num_experts(self, config: dict[str, Any]) -> int:
        for key in self.num_experts_keys:
            if config.get(key):
                return int(config[key])
        return 0

    def moe_layers(self, config: dict[str, Any]) -> list[int]:
        """Indices of decoder layers with routed experts."""
        n_layers = self.num_layers(config)
        if self.num_experts(config) == 0:
            return []
        if self.dense_layers == "first_k_dense_replace":
            first = int(config.get("first_k_dense_replace", 0) or 0)
            return list(range(first, n_layers))
        if self.dense_layers == "decoder_sparse_step":
            step = int(config.get("decoder_sparse_step", 1) or 1)
            mlp_only = set(config.get("mlp_only_layers") or [])
            return [i for i in range(n_layers) if i not in mlp_only and (i + 1) % step == 0]
        return list(range(n_layers))

    def summary(self, config: dict[str, Any]) -> dict[str, Any]:
        """The architecture facts ``quantkit inspect`` prints."""
        moe = self.moe_layers(config)
        facts: dict[str, Any] = {
            "model_type": self.model_type,
            "family": self.description,
            "layers": self.num_layers(config),
            "hidden_size": config.get("hidden_size"),
            "vocab_size": config.get("vocab_size"),
        }
        if self.num_experts(config):
            facts["routed_experts_per_layer"] = self.num_experts(config)
            facts["experts_per_token"] = config.get("num_experts_per_tok")
            facts["moe_layers"] = len(moe)
            facts["dense_layers"] = [i for i in range(self.num_layers(config)) if i not in set(moe)]
            if self.shared_experts_key:
                facts[self.shared_experts_key] = config.get(self.shared_experts_key)
        for key in self.extra_config_keys:
            if key in config:
                facts[key] = config[key]
        return facts
