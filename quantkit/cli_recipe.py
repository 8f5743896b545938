"""The options that make the recipe: where it comes from, its scheme fields, k-quant types and GPTQ's solver.

Each group is an :class:`~quantkit.cli_groups.OptionGroup`; :func:`build_recipe` turns them into the
:class:`~quantkit.recipe.Recipe` that ``inspect`` and ``quantize`` take (unset options leave the file's or
preset's values).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from quantkit.cli_groups import OptionGroup
from quantkit.errors import QuantkitError

if TYPE_CHECKING:  # imported when used, to keep --help fast
    from quantkit.recipe import Recipe


@dataclass(frozen=True)
class RecipeOptions(OptionGroup):
    """Where the recipe comes from, and the rules the command line adds to it."""

    panel = "Recipe"
    preset: Annotated[
        str | None,
        typer.Option("--preset", "-p", help="Named recipe or k-quant preset, e.g. Q4_K_M (`quantkit presets`)."),
    ] = None
    recipe: Annotated[Path | None, typer.Option("--recipe", "-r", help="Recipe file (YAML or JSON).")] = None
    shared_experts_bits: Annotated[
        int | None,
        typer.Option("--shared-experts-bits", help="Bits for shared experts (routed experts keep the default)."),
    ] = None
    ignore: Annotated[
        list[str] | None, typer.Option("--ignore", help="Keep tensors matching this pattern in float (repeatable).")
    ] = None


@dataclass(frozen=True)
class SchemeOptions(OptionGroup):
    """The default scheme's method and grid."""

    panel = "Scheme"
    method: Annotated[
        str | None, typer.Option("--method", "-m", help="absmax | zeropoint | gptq | kquant | ternary | fp16 | bf16.")
    ] = None
    bits: Annotated[int | None, typer.Option("--bits", "-b", help="Integer bits, 2-8.")] = None
    group_size: Annotated[int | None, typer.Option(
        "--group-size", "-g", help="Weights per scale along a row (the last group may be shorter); -1 or 0: per row."
    )] = None
    granularity: Annotated[
        str | None, typer.Option("--granularity", help="tensor | channel | group (a group size implies group).")
    ] = None
    range_mode: Annotated[
        str | None,
        typer.Option("--range", help="absmax grid: restricted [-(2^(b-1)-1), ..] or full [-2^(b-1), ..]."),
    ] = None

    def overrides(self) -> dict[str, Any]:
        return {"method": self.method, "bits": self.bits, "group_size": self.group_size,
                "granularity": self.granularity, "range": self.range_mode}


@dataclass(frozen=True)
class RangeOptions(OptionGroup):
    """How the default scheme clips weights and quantizes activations (quantize only)."""

    panel = "Scheme"
    weight_clip: Annotated[
        str | None, typer.Option("--weight-clip", help="Per-channel/group weight clipping: minmax | percentile | mse.")
    ] = None
    percentile: Annotated[
        float | None, typer.Option("--percentile", help="For --weight-clip/--range-method percentile (default 99.99).")
    ] = None
    activations: Annotated[
        str | None, typer.Option("--activations", help="INT8 input activations: none | static | dynamic.")
    ] = None
    range_method: Annotated[
        str | None, typer.Option("--range-method", help="Static activation ranges: minmax | percentile | mse | kl.")
    ] = None

    def overrides(self) -> dict[str, Any]:
        return {"clip": self.weight_clip, "percentile": self.percentile, "activations": self.activations,
                "activation_range": self.range_method}


@dataclass(frozen=True)
class KquantOptions(OptionGroup):
    """llama.cpp block types: one for every weight, or a preset's choice overridden for some roles."""

    panel = "k-quant"
    ggml_type: Annotated[
        str | None,
        typer.Option("--type", "-t", help="kquant: one ggml type for every weight (Q2_K..Q6_K, Q8_0, TQ2_0, ...)."),
    ] = None
    shared_experts_type: Annotated[
        str | None, typer.Option("--shared-experts-type", help="kquant preset: ggml type of the shared experts.")
    ] = None
    dense_ffn_type: Annotated[
        str | None, typer.Option("--dense-ffn-type", help="kquant preset: ggml type of dense (non-MoE) layers' FFN.")
    ] = None
    tensor_type: Annotated[list[str] | None, typer.Option(
        "--tensor-type", help="kquant preset: PATTERN=TYPE, as llama-quantize (regex searched in the GGUF name; "
        "the first match wins; repeatable).")] = None
    output_tensor_type: Annotated[
        str | None, typer.Option("--output-tensor-type", help="kquant preset: ggml type of output.weight.")
    ] = None
    token_embedding_type: Annotated[
        str | None, typer.Option("--token-embedding-type", help="kquant preset: ggml type of token_embd.weight.")
    ] = None

    def overrides(self) -> dict[str, Any]:
        from quantkit.kquants.preset_overrides import join_tensor_types  # deferred: --help stays fast

        return {"ggml_type": self.ggml_type, "tensor_types": join_tensor_types(self.tensor_type),
                "output_tensor_type": self.output_tensor_type, "token_embedding_type": self.token_embedding_type}


@dataclass(frozen=True)
class GptqOptions(OptionGroup):
    """GPTQ's solver settings (scheme fields) and its memory bound (quantize only)."""

    panel = "GPTQ"
    act_order: Annotated[
        bool, typer.Option("--act-order", help="GPTQ: columns by decreasing Hessian diagonal.")
    ] = False
    static_groups: Annotated[
        bool, typer.Option("--static-groups", help="GPTQ: group parameters fixed before act-order.")
    ] = False
    sym: Annotated[bool, typer.Option("--sym", help="GPTQ: symmetric grid (no zero points).")] = False
    damp: Annotated[float | None, typer.Option("--damp", help="GPTQ: dampening, fraction of mean diag(H).")] = None
    block_size: Annotated[int | None, typer.Option("--block-size", help="GPTQ: columns per lazy update.")] = None
    group_fit: Annotated[
        str | None, typer.Option("--group-fit", help="GPTQ: block-start (the reference's) | current weights.")
    ] = None
    max_memory: Annotated[
        str | None, typer.Option("--max-memory", help="GPTQ: memory for experts at once (default: half available).")
    ] = None
    true_sequential: Annotated[
        bool, typer.Option("--true-sequential/--no-true-sequential",
                           help="GPTQ: each Hessian after the layer's earlier weights are quantized; "
                                "off: one pass per layer, on its float weights.")
    ] = True

    def overrides(self) -> dict[str, Any]:
        return {"act_order": self.act_order or None, "static_groups": self.static_groups or None,
                "symmetric": self.sym or None, "damp": self.damp, "block_size": self.block_size,
                "group_fit": self.group_fit}


SETTING_FLAGS = {  # scheme settings the command line sets, by the option that sets them
    "bits": "--bits", "group_size": "--group-size", "granularity": "--granularity", "range": "--range",
    "clip": "--weight-clip", "percentile": "--percentile", "activations": "--activations",
    "activation_range": "--range-method", "symmetric": "--sym", "act_order": "--act-order",
    "static_groups": "--static-groups", "damp": "--damp", "block_size": "--block-size", "group_fit": "--group-fit",
    "ggml_type": "--type", "tensor_types": "--tensor-type", "output_tensor_type": "--output-tensor-type",
    "token_embedding_type": "--token-embedding-type",
}


def build_recipe(source: RecipeOptions, kquant: KquantOptions,
                 *schemes: SchemeOptions | RangeOptions | GptqOptions) -> Recipe:
    """The recipe from a file or preset, with the command line's scheme fields (unset: None) and rules applied."""
    from quantkit.model.archs.base import Role  # deferred: pulls in torch; --help stays fast
    from quantkit.recipe import DEFAULT_PRESET, get_preset, load_recipe
    from quantkit.schemes import IntConfig
    from quantkit.schemes.config import SettingNotApplicable

    if source.preset and source.recipe:
        raise QuantkitError("pass either --preset or --recipe, not both")
    recipe = load_recipe(source.recipe) if source.recipe else get_preset(source.preset or DEFAULT_PRESET)
    overrides = kquant.overrides()
    for scheme in schemes:
        overrides.update(scheme.overrides())
    try:
        if any(v is not None for v in overrides.values()):
            recipe = recipe.with_default(**overrides)
    except SettingNotApplicable as exc:
        flags = ", ".join(SETTING_FLAGS.get(setting, setting) for setting in exc.settings)
        raise QuantkitError(f"{flags} {'does' if len(exc.settings) == 1 else 'do'} not apply to method "
                            f"{exc.method}") from None
    if source.shared_experts_bits is not None and not isinstance(recipe.default, IntConfig):
        raise QuantkitError(f"--shared-experts-bits applies to integer methods, not {recipe.default.method}"
                            + (" (use --shared-experts-type)" if recipe.default.method == "kquant" else ""))
    if source.shared_experts_bits is not None:
        recipe = recipe.with_rule(["role:shared_expert"], bits=source.shared_experts_bits)
    if kquant.shared_experts_type is not None:
        recipe = recipe.with_kquant_type(Role.SHARED_EXPERT, kquant.shared_experts_type, "--shared-experts-type")
    if kquant.dense_ffn_type is not None:
        recipe = recipe.with_kquant_type(Role.DENSE_MLP, kquant.dense_ffn_type, "--dense-ffn-type")
    if source.ignore:
        recipe = recipe.with_ignore(source.ignore)
    return recipe
