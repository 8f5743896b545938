"""The block type of every k-quant weight in a plan: a preset's llama.cpp rules, or one ``--type``.

Plans name tensors as the Hugging Face checkpoint does; llama.cpp's rules speak of GGUF names
(``blk.3.ffn_down_exps.weight``), where a layer's routed experts are one tensor. Each planned
tensor is mapped to its GGUF name (experts of a layer share one, so they always share a type),
the preset assigns a type per GGUF tensor, and the assignment comes back to every Hugging Face
tensor behind it: a block type, ``F16`` (a float16 cast) or ``F32`` (kept as it is). An architecture
whose GGUF needs ``output.weight`` even with tied embeddings (qwen2moe) has it placed as llama.cpp sees
it, an untied output; its type goes to ``QuantPlan.tied_output``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace
from typing import TYPE_CHECKING

from quantkit.kquants.presets import Assignment, TensorSpec, assign_types, fallback_type, is_llama_70b
from quantkit.model.archs.base import Role
from quantkit.model.gguf_names import gguf_name
from quantkit.recipe import pattern_matches
from quantkit.schemes import KquantConfig, SchemeConfig, make_config

if TYPE_CHECKING:  # plan.py calls this module; at run time it only rebuilds plans with dataclasses.replace
    from quantkit.plan import QuantPlan, TensorPlan

PRESET_EXTRA_ROLES = (Role.EMBEDDING, Role.LM_HEAD)  # llama.cpp's presets quantize these too
TIED_OUTPUT = "output.weight"  # the GGUF tensor some architectures add for tied embeddings


def resolve_kquant_types(plan: QuantPlan) -> QuantPlan:
    """``plan`` with a concrete ``ggml_type`` on every kquant tensor (or a float scheme where rules say so)."""
    default = plan.recipe.default
    kquant = [t for t in plan.tensors if isinstance(t.scheme, KquantConfig)]
    if not kquant and not isinstance(default, KquantConfig):
        return plan
    preset = default.kquant_preset if isinstance(default, KquantConfig) else None
    assignments: dict[str, Assignment] = {}
    if preset is not None:
        assert isinstance(default, KquantConfig)
        assignments = _preset_assignments(plan, default)
    resolved: dict[str, tuple[SchemeConfig | None, str]] = {}
    unknown = set(plan.unexpected)  # kept as stored, e.g. an lm_head that a tied config does not use
    for item in plan.tensors:
        scheme = item.scheme
        if item.name in unknown:
            continue
        candidate = isinstance(scheme, KquantConfig)
        extra = preset is not None and scheme is None and item.role in PRESET_EXTRA_ROLES and len(item.shape) == 2
        if not (candidate or extra) or _ignored(plan, item):
            continue
        base = scheme if scheme is not None else default  # without a scheme: a preset's extra role
        assert isinstance(base, KquantConfig)
        if base.ggml_type is not None:  # an explicit type (--type or a recipe rule): only the row fallback applies
            rule = plan.recipe.rule_for(item.name, item.role)
            by_rule = f"rule {', '.join(rule.patterns)}" if rule is not None and "ggml_type" in rule.changes else None
            assignment = (fallback_type(base.ggml_type, item.shape[-1], by_rule)
                          or Assignment(base.ggml_type, by_rule or "--type"))
        else:
            assignment = assignments[item.name]
        resolved[item.name] = (_scheme_of(base, assignment.type), assignment.rule)
    sources = [
        replace(s, outputs=tuple(replace(t, scheme=resolved[t.name][0]) if t.name in resolved else t
                                 for t in s.outputs))
        for s in plan.sources
    ]
    rules = {name: rule for name, (_, rule) in resolved.items()}
    tied_output = assignments.get(TIED_OUTPUT)
    embedding = next((t for t in plan.tensors if t.role is Role.EMBEDDING), None)
    if tied_output is None or embedding is None or embedding.name not in resolved:  # or the embedding is ignored
        return replace(plan, sources=sources, type_rules=rules)
    assert isinstance(default, KquantConfig)
    scheme = _scheme_of(default, tied_output.type)
    return replace(plan, sources=sources, type_rules={**rules, TIED_OUTPUT: tied_output.rule},
                   tied_output=(scheme,))


def _scheme_of(base: KquantConfig, type_name: str) -> SchemeConfig | None:
    if type_name == "F32":
        return None
    if type_name == "F16":
        return make_config("fp16")
    return replace(base, ggml_type=type_name)


def _ignored(plan: QuantPlan, item: TensorPlan) -> bool:
    return any(pattern_matches(p, item.name, item.role) for p in plan.recipe.ignore)


def _preset_assignments(plan: QuantPlan, default: KquantConfig) -> dict[str, Assignment]:
    """The preset's assignment of every planned tensor with a GGUF name, keyed by Hugging Face name
    (and :data:`TIED_OUTPUT`'s, where the GGUF adds it)."""
    assert default.kquant_preset is not None
    config = plan.checkpoint.config
    n_layers = plan.arch.num_layers(config)
    by_gguf: dict[str, list[TensorPlan]] = defaultdict(list)
    unknown = set(plan.unexpected)
    for item in plan.tensors:
        if item.name in unknown:
            continue
        name, _ = gguf_name(plan.checkpoint.model_type, item.name, n_layers)
        by_gguf[name].append(item)
    specs = [
        TensorSpec(name, tuple(items[0].shape) if len(items) == 1 else (len(items), *items[0].shape))
        for name, items in by_gguf.items()
    ]
    gguf = plan.arch.gguf
    export = gguf.export if gguf is not None else None
    tied_output = export is not None and export.output_when_tied and TIED_OUTPUT not in by_gguf
    embedding = next((spec for spec in specs if spec.name == "token_embd.weight"), None)
    if tied_output and embedding is not None:  # the GGUF's output.weight is the embedding: llama.cpp sees it untied
        specs.append(TensorSpec(TIED_OUTPUT, embedding.shape))
    n_head = int(config.get("num_attention_heads", 1))
    n_head_kv = int(config.get(export.head_count_kv if export else "num_key_value_heads") or n_head)
    n_experts = plan.arch.num_experts(config) or 0
    types = assign_types(
        default.kquant_preset, specs, n_layers=n_layers, n_experts=n_experts, n_head=n_head, n_head_kv=n_head_kv,
        llama_70b=is_llama_70b(gguf.arch if gguf else "", n_layers, n_experts, n_head, n_head_kv),
        overrides=default.overrides(),
    )
    assigned = {item.name: types[name] for name, items in by_gguf.items() for item in items}
    if TIED_OUTPUT in types and TIED_OUTPUT not in by_gguf:
        assigned[TIED_OUTPUT] = types[TIED_OUTPUT]
    return assigned
