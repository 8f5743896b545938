"""The tensors of a GGUF file, grouped from the plan: one per GGUF name, routed experts stacked.

Every plan weight gets its llama.cpp name (:mod:`quantkit.model.gguf_names`); per-expert weights of
one projection become one 3-D tensor, expert first. Shapes are numpy's (rows last). Left out: RoPE
caches, a tied ``lm_head`` (llama.cpp reuses ``token_embd``) and layers past the decoder (DeepSeek's
multi-token prediction). Added: llama3 RoPE's ``rope_freqs`` and, where the architecture needs it, an
``output.weight`` made of the tied embedding (in the type a k-quant preset gave it, ``plan.tied_output``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from quantkit.errors import QuantkitError
from quantkit.formats.output import FileTensor
from quantkit.model.gguf_names import gguf_name
from quantkit.model.gguf_spec import GgufExport
from quantkit.plan import QuantPlan, TensorPlan, natural_key

ROPE_FREQS = "rope_freqs.weight"
# GGUF tensors llama.cpp (and convert_hf_to_gguf.py) keep in F32 besides 1-D ones: routers and biases
_F32_SUFFIXES = ("_norm.weight", "ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight", ".bias")


def keeps_f32(tensor: FileTensor) -> bool:
    """Norms, routers, biases and other 1-D tensors: llama.cpp wants them in F32."""
    return len(tensor.shape) == 1 or tensor.name.endswith(_F32_SUFFIXES)


def gguf_tensors(plan: QuantPlan, export: GgufExport, hparams: dict[str, Any],
                 rope_freqs: int | None) -> list[FileTensor]:
    """Every tensor of the GGUF for ``plan``, in file order; ``rope_freqs``: the length of llama3's factors."""
    n_layers = int(hparams["num_hidden_layers"])
    tied = bool(hparams.get("tie_word_embeddings"))
    groups: dict[str, TensorPlan | dict[int, TensorPlan]] = {}  # a single weight, or experts by index
    # natural order of the per-expert names: one file order whether the checkpoint stores experts fused or not
    for item in sorted(plan.tensors, key=lambda t: natural_key(t.name)):
        if _left_out(item.name, n_layers, tied):
            continue
        name, expert = gguf_name(plan.arch.model_type, item.name, n_layers)
        existing = groups.get(name)
        if existing is None:
            groups[name] = item if expert is None else {expert: item}
        elif expert is not None and isinstance(existing, dict) and expert not in existing:
            existing[expert] = item
        else:
            raise QuantkitError(f"{item.name}: a second checkpoint tensor for GGUF tensor {name}")
    n_experts = plan.arch.num_experts(hparams)
    tensors = [_tensor(name, group, n_experts) for name, group in groups.items()]
    if rope_freqs is not None:
        tensors.append(FileTensor(ROPE_FREQS, (), (rope_freqs,)))
    if export.output_when_tied and tied:
        embedding = {t.name: t for t in tensors}["token_embd.weight"]
        items = embedding.items
        if plan.tied_output:  # a preset placed it as llama.cpp sees it: an untied output with its own type
            items = tuple(replace(item, scheme=plan.tied_output[0]) for item in items)
        tensors.append(FileTensor("output.weight", items, embedding.shape))
    return tensors


def _tensor(name: str, group: TensorPlan | dict[int, TensorPlan], n_experts: int) -> FileTensor:
    """One GGUF tensor: a single plan weight, or every expert's, stacked in expert order (one scheme for all)."""
    if not isinstance(group, dict):
        return FileTensor(name, (group,), group.shape)
    if sorted(group) != list(range(n_experts)) or len({item.shape for item in group.values()}) != 1:
        raise QuantkitError(f"{name}: the checkpoint holds experts {sorted(group)} of {n_experts}, or mixed shapes")
    items = tuple(group[e] for e in range(n_experts))
    if len({item.scheme for item in items}) != 1:
        raise QuantkitError(f"{name}: GGUF stores all experts of a tensor in one type; the recipe mixes them")
    return FileTensor(name, items, (n_experts, *items[0].shape))


def _left_out(name: str, n_layers: int, tied: bool) -> bool:
    """Plan weights llama.cpp has no place for: RoPE caches, a tied lm_head, layers past the decoder (MTP)."""
    if name.endswith("rotary_emb.inv_freq") or (tied and name.endswith("lm_head.weight")):
        return True
    parts = name.split(".")
    if "layers" in parts and parts.index("layers") + 1 < len(parts):
        layer = parts[parts.index("layers") + 1]
        return layer.isdigit() and int(layer) >= n_layers
    return False
