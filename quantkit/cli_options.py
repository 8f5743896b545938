"""The command line's options, each declared once, in groups that each become one object of the API.

A command takes a group (an :class:`~quantkit.cli_groups.OptionGroup`, a dataclass whose fields are the
options) as one parameter (:func:`~quantkit.cli_groups.option_groups`). Each group turns into what the API
takes by one function here: the recipe (:func:`build_recipe`), ``QuantizeOptions``
(:func:`quantize_options`), ``CalibrationSettings`` and ``EvalSettings``. :mod:`quantkit.cli` holds the
commands: parse, build, call the API, print.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from quantkit.cli_groups import OptionGroup
from quantkit.cli_output import err_console
from quantkit.cli_values import command_line, parse_size, resolve_device
from quantkit.errors import QuantkitError

if TYPE_CHECKING:  # imported when used, to keep --help fast
    from quantkit.api import QuantizeOptions
    from quantkit.calib.run import CalibrationSettings
    from quantkit.eval.run import EvalSettings
    from quantkit.recipe import Recipe

# Options of several commands, outside any group.
ModelArg = Annotated[
    str | None,
    typer.Argument(help="Checkpoint directory or hub id; default: the bundled demo model.", show_default=False),
]
EvalModelArg = Annotated[
    str | None,
    typer.Argument(help="Checkpoint directory, GGUF file or hub id; default: the bundled demo model.",
                   show_default=False),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")]
TrustRemoteCodeOpt = Annotated[
    bool, typer.Option("--trust-remote-code", help="Run Python code shipped in the model directory (auto_map).")
]
TextFieldOpt = Annotated[str, typer.Option("--text-field", help="Field holding text in jsonl/parquet.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu | cuda | auto.")]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", help="Windows per forward pass.")]


# What the recipe is: inspect and quantize.


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
                "symmetric": self.sym or None, "damp": self.damp, "block_size": self.block_size}


SETTING_FLAGS = {  # scheme settings the command line sets, by the option that sets them
    "bits": "--bits", "group_size": "--group-size", "granularity": "--granularity", "range": "--range",
    "clip": "--weight-clip", "percentile": "--percentile", "activations": "--activations",
    "activation_range": "--range-method", "symmetric": "--sym", "act_order": "--act-order",
    "static_groups": "--static-groups", "damp": "--damp", "block_size": "--block-size", "ggml_type": "--type",
    "tensor_types": "--tensor-type", "output_tensor_type": "--output-tensor-type",
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


# How quantize runs.


@dataclass(frozen=True)
class QuantizeDataOptions(OptionGroup):
    """A calibration directory, and the text GPTQ runs on (unset: the calibration's windows, else the default)."""

    panel = "Calibration data"
    calibration: Annotated[
        Path | None, typer.Option("--calibration", "-c", help="Directory from `quantkit calibrate` (same model).")
    ] = None
    dataset: Annotated[
        str | None, typer.Option("--dataset", "-d", help="GPTQ calibration text (as for calibrate).")
    ] = None
    num_samples: Annotated[int | None, typer.Option("--num-samples", "-n", help="GPTQ: token windows.")] = None
    seq_len: Annotated[int | None, typer.Option("--seq-len", help="GPTQ: tokens per window.")] = None
    text_field: TextFieldOpt = "text"
    all_experts: Annotated[
        bool, typer.Option("--all-experts", help="GPTQ: every token through every expert for the Hessians.")
    ] = False
    min_expert_tokens: Annotated[
        int | None, typer.Option("--min-expert-tokens", help="GPTQ: blend Hessians of experts below this.")
    ] = None
    device: Annotated[str, typer.Option("--device", help="GPTQ: cpu | cuda | auto.")] = "auto"

    def settings(self, trust_remote_code: bool, seed: int) -> CalibrationSettings | None:
        """GPTQ's calibration windows, or None to let ``quantize`` take the calibration's/defaults.

        Windows sampled here are drawn with ``seed`` (quantize's ``--seed``); a calibration directory's
        windows keep the seed they were drawn with.
        """
        from quantkit.calib.artifact import load_calibration  # deferred: pulls in torch; --help stays fast
        from quantkit.calib.run import CalibrationSettings, settings_of

        device = resolve_device(self.device)

        if any(v is not None for v in (self.dataset, self.num_samples, self.seq_len, self.min_expert_tokens)) \
                or self.all_experts:
            defaults = CalibrationSettings()
            return CalibrationSettings(
                dataset=self.dataset, num_samples=self.num_samples or defaults.num_samples, seq_len=self.seq_len,
                text_field=self.text_field, all_experts=self.all_experts, device=device,
                trust_remote_code=trust_remote_code, seed=seed,
                min_expert_tokens=defaults.min_expert_tokens if self.min_expert_tokens is None
                else self.min_expert_tokens,
            )
        if device == "cpu" and not trust_remote_code:
            return None
        base = (settings_of(load_calibration(self.calibration), trust_remote_code) if self.calibration is not None
                else CalibrationSettings(trust_remote_code=trust_remote_code, seed=seed))
        return replace(base, device=device)


@dataclass(frozen=True)
class OutputOptions(OptionGroup):
    """Where quantize writes, in which format, and how."""

    panel = "Output"
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Output directory; default ./<model>-<scheme>.")
    ] = None
    output_format: Annotated[
        str, typer.Option("--format", help="auto | compressed-tensors | gptq-v1 (GPTQ) | ggml | gguf (kquant).")
    ] = "auto"
    max_shard_size: Annotated[str, typer.Option("--max-shard-size", help="Shard size, e.g. 2GB, 500MB.")] = "2GB"
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace OUT if it is a previous quantkit output (never anything else).")
    ] = False


def quantize_options(model: str | None, recipe: Recipe, output: OutputOptions, data: QuantizeDataOptions,
                     gptq: GptqOptions, *, seed: int, trust_remote_code: bool,
                     show_progress: bool) -> tuple[Path, QuantizeOptions]:
    """Where quantize writes (default ./<model>-<scheme>) and how it runs, from its groups of options."""
    from quantkit import api  # deferred: pulls in torch; --help stays fast
    from quantkit.model.checkpoint import resolve_model_path

    settings = data.settings(trust_remote_code, seed)
    out = output.out
    if out is None:
        suffix = ".gguf" if output.output_format == "gguf" else ""
        out = Path(f"{resolve_model_path(model).name}-{_slug(recipe.default.describe())}{suffix}")
    return out, api.QuantizeOptions(
        overwrite=output.overwrite,
        max_shard_bytes=parse_size(output.max_shard_size),
        seed=seed,
        calibration=data.calibration,
        data=settings,
        output_format=output.output_format,
        max_memory=parse_size(gptq.max_memory) if gptq.max_memory is not None else None,
        true_sequential=gptq.true_sequential,
        command=command_line(),
        show_progress=show_progress,
        console=err_console,
    )


# What calibrate and eval perplexity read.


@dataclass(frozen=True)
class CalibrationDataOptions(OptionGroup):
    """The text calibrate runs through the model, and what it records (calibrate's defaults are the API's)."""

    panel = "Calibration data"
    dataset: Annotated[
        str | None,
        typer.Option("--dataset", "-d", help="Hub recipe (wikitext2, c4, ptb, pile-val; online) or a local "
                     "txt/jsonl/parquet file or folder; default: the bundled calibration_data/default."),
    ] = None
    text_field: TextFieldOpt = "text"
    split: Annotated[str | None, typer.Option("--split", help="Hub split (default: the recipe's).")] = None
    num_samples: Annotated[int, typer.Option("--num-samples", "-n", help="Token windows to sample.")] = 128
    seq_len: Annotated[
        int | None, typer.Option("--seq-len", help="Tokens per window; default min(2048, model context).")
    ] = None
    seed: Annotated[int, typer.Option("--seed", help="Seed for sampling the windows.")] = 0
    batch_size: BatchSizeOpt = 4
    all_experts: Annotated[
        bool, typer.Option("--all-experts", help="Every token through every expert, for statistics only.")
    ] = False
    min_expert_tokens: Annotated[
        int, typer.Option("--min-expert-tokens", help="Flag experts observed on fewer tokens (fallback applies).")
    ] = 16
    plot: Annotated[list[str] | None, typer.Option("--plot", help="Also plot these sites (glob, repeatable).")] = None

    def settings(self, device: str, trust_remote_code: bool) -> CalibrationSettings:
        from quantkit.calib.run import CalibrationSettings  # deferred: pulls in torch; --help stays fast

        return CalibrationSettings(
            dataset=self.dataset, num_samples=self.num_samples, seq_len=self.seq_len, seed=self.seed,
            batch_size=self.batch_size, text_field=self.text_field, split=self.split, all_experts=self.all_experts,
            min_expert_tokens=self.min_expert_tokens, plot=tuple(self.plot or ()), device=resolve_device(device),
            trust_remote_code=trust_remote_code,
        )


@dataclass(frozen=True)
class EvalOptions(OptionGroup):
    """The text, protocol and numerics of a perplexity run (eval perplexity's defaults are the API's)."""

    panel = "Evaluation"
    dataset: Annotated[
        str, typer.Option("--dataset", "-d", help="wikitext2 | c4 | ptb (hub recipes, online) or a local file/folder.")
    ] = "wikitext2"
    text_field: TextFieldOpt = "text"
    split: Annotated[str | None, typer.Option("--split", help="Hub split (default: the protocol's).")] = None
    protocol: Annotated[str, typer.Option("--protocol", help="gptq | llamacpp (see docs/evaluation.md).")] = "gptq"
    seq_len: Annotated[
        int | None, typer.Option("--seq-len", help="Window length; default 2048 (gptq) or 512 (llamacpp).")
    ] = None
    stride: Annotated[
        int | None, typer.Option("--stride", help="Sliding windows advancing by this many tokens.")
    ] = None
    max_windows: Annotated[int | None, typer.Option("--max-windows", help="Evaluate only the first N.")] = None
    batch_size: BatchSizeOpt = 4
    dtype: Annotated[str, typer.Option("--dtype", help="float32 | bfloat16 | float16.")] = "float32"
    device: DeviceOpt = "auto"
    tokenizer: Annotated[
        str | None, typer.Option("--tokenizer", help="Tokenizer directory or GGUF (default: MODEL's, --base's, "
                                                   "then a GGUF's own).")
    ] = None

    def settings(self, trust_remote_code: bool) -> EvalSettings:
        from quantkit.eval.run import EvalSettings  # deferred: pulls in torch; --help stays fast

        return EvalSettings(dataset=self.dataset, protocol=self.protocol, seq_len=self.seq_len, stride=self.stride,
                            max_windows=self.max_windows, batch_size=self.batch_size, text_field=self.text_field,
                            split=self.split, dtype=self.dtype, device=resolve_device(self.device),
                            trust_remote_code=trust_remote_code, tokenizer=self.tokenizer)


# Values that options spell as text.


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()
