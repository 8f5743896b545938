"""The ``quantkit`` command line: parses and validates options, calls :mod:`quantkit.api`, prints."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from quantkit.cli_errors import user_errors
from quantkit.cli_output import (
    console,
    err_console,
    print_calibration,
    print_eval,
    print_inspection,
    print_preset_rules,
    print_presets,
)
from quantkit.errors import QuantkitError

app = typer.Typer(
    name="quantkit",
    help="Post-training quantization for Hugging Face Mixture-of-Experts models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

ModelArg = Annotated[
    str | None,
    typer.Argument(help="Checkpoint directory or hub id; default: the bundled demo model.", show_default=False),
]
MethodOpt = Annotated[
    str | None, typer.Option("--method", "-m", help="absmax | zeropoint | gptq | kquant | fp16 | bf16.")
]
BitsOpt = Annotated[int | None, typer.Option("--bits", "-b", help="Integer bits, 2-8.")]
GroupOpt = Annotated[int | None, typer.Option("--group-size", "-g", help="Weights per scale along a row.")]
GranularityOpt = Annotated[
    str | None, typer.Option("--granularity", help="tensor | channel | group (a group size implies group).")
]
RangeOpt = Annotated[
    str | None, typer.Option("--range", help="absmax grid: restricted [-(2^(b-1)-1), ..] or full [-2^(b-1), ..].")
]
WeightClipOpt = Annotated[
    str | None, typer.Option("--weight-clip", help="Per-channel/group weight clipping: minmax | percentile | mse.")
]
PercentileOpt = Annotated[
    float | None, typer.Option("--percentile", help="For --weight-clip/--range-method percentile (default 99.99).")
]
ActivationsOpt = Annotated[
    str | None, typer.Option("--activations", help="INT8 input activations: none | static | dynamic.")
]
RangeMethodOpt = Annotated[
    str | None, typer.Option("--range-method", help="Static activation ranges: minmax | percentile | mse | kl.")
]
PresetOpt = Annotated[
    str | None, typer.Option("--preset", "-p", help="Named recipe or k-quant preset, e.g. Q4_K_M (`quantkit presets`).")
]
TypeOpt = Annotated[
    str | None, typer.Option("--type", "-t", help="kquant: one ggml type for every weight (Q2_K..Q6_K, Q8_0, ...).")
]
SharedTypeOpt = Annotated[
    str | None, typer.Option("--shared-experts-type", help="kquant preset: ggml type of the shared experts.")
]
DenseTypeOpt = Annotated[
    str | None, typer.Option("--dense-ffn-type", help="kquant preset: ggml type of dense (non-MoE) layers' FFN.")
]
RecipeOpt = Annotated[Path | None, typer.Option("--recipe", "-r", help="Recipe file (YAML or JSON).")]
SharedBitsOpt = Annotated[
    int | None, typer.Option("--shared-experts-bits", help="Bits for shared experts (routed experts keep the default).")
]
IgnoreOpt = Annotated[
    list[str] | None, typer.Option("--ignore", help="Keep tensors matching this pattern in float (repeatable).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")]
TrustRemoteCodeOpt = Annotated[
    bool, typer.Option("--trust-remote-code", help="Run Python code shipped in the model directory (auto_map).")
]


def build_recipe(
    preset: str | None,
    recipe_file: Path | None,
    overrides: dict[str, Any],
    shared_experts_bits: int | None,
    ignore: list[str] | None,
    shared_experts_type: str | None = None,
    dense_ffn_type: str | None = None,
):  # -> Recipe (imported lazily to keep --help fast)
    """The recipe from a file or preset, with command-line scheme ``overrides`` (None = unset) and rules applied."""
    from quantkit.model.archs.base import Role
    from quantkit.recipe import DEFAULT_PRESET, get_preset, load_recipe

    if preset and recipe_file:
        raise QuantkitError("pass either --preset or --recipe, not both")
    recipe = load_recipe(recipe_file) if recipe_file else get_preset(preset or DEFAULT_PRESET)
    if any(v is not None for v in overrides.values()):
        recipe = recipe.with_default(**overrides)
    if shared_experts_bits is not None:
        recipe = recipe.with_rule(["role:shared_expert"], bits=shared_experts_bits)
    if shared_experts_type is not None:
        recipe = recipe.with_kquant_type(Role.SHARED_EXPERT, shared_experts_type, "--shared-experts-type")
    if dense_ffn_type is not None:
        recipe = recipe.with_kquant_type(Role.DENSE_MLP, dense_ffn_type, "--dense-ffn-type")
    if ignore:
        recipe = recipe.with_ignore(ignore)
    return recipe


@app.command()
@user_errors
def inspect(
    model: ModelArg = None,
    method: MethodOpt = None,
    bits: BitsOpt = None,
    group_size: GroupOpt = None,
    granularity: GranularityOpt = None,
    range_mode: RangeOpt = None,
    preset: PresetOpt = None,
    recipe: RecipeOpt = None,
    shared_experts_bits: SharedBitsOpt = None,
    ignore: IgnoreOpt = None,
    ggml_type: TypeOpt = None,
    shared_experts_type: SharedTypeOpt = None,
    dense_ffn_type: DenseTypeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Architecture, layers, experts (routed/shared), parameters, and what the recipe would do."""
    from quantkit import api

    overrides = {"method": method, "bits": bits, "group_size": group_size, "granularity": granularity,
                 "range": range_mode, "ggml_type": ggml_type}
    info = api.inspect(model, build_recipe(preset, recipe, overrides, shared_experts_bits, ignore,
                                           shared_experts_type, dense_ffn_type))
    if as_json:
        console.print_json(json.dumps(info))
        return
    print_inspection(info)


@app.command()
@user_errors
def quantize(
    model: ModelArg = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Output directory; default ./<model>-<scheme>.")
    ] = None,
    method: MethodOpt = None,
    bits: BitsOpt = None,
    group_size: GroupOpt = None,
    granularity: GranularityOpt = None,
    range_mode: RangeOpt = None,
    weight_clip: WeightClipOpt = None,
    percentile: PercentileOpt = None,
    activations: ActivationsOpt = None,
    range_method: RangeMethodOpt = None,
    preset: PresetOpt = None,
    recipe: RecipeOpt = None,
    shared_experts_bits: SharedBitsOpt = None,
    ignore: IgnoreOpt = None,
    ggml_type: TypeOpt = None,
    shared_experts_type: SharedTypeOpt = None,
    dense_ffn_type: DenseTypeOpt = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace OUT if it is a previous quantkit output (never anything else).")
    ] = False,
    max_shard_size: Annotated[str, typer.Option("--max-shard-size", help="Shard size, e.g. 2GB, 500MB.")] = "2GB",
    seed: Annotated[int, typer.Option("--seed", help="Random seed (recorded in the report).")] = 0,
    calibration: Annotated[
        Path | None, typer.Option("--calibration", "-c", help="Directory from `quantkit calibrate` (same model).")
    ] = None,
    act_order: Annotated[
        bool, typer.Option("--act-order", help="GPTQ: columns by decreasing Hessian diagonal.")
    ] = False,
    static_groups: Annotated[
        bool, typer.Option("--static-groups", help="GPTQ: group parameters fixed before act-order.")
    ] = False,
    sym: Annotated[bool, typer.Option("--sym", help="GPTQ: symmetric grid (no zero points).")] = False,
    damp: Annotated[float | None, typer.Option("--damp", help="GPTQ: dampening, fraction of mean diag(H).")] = None,
    block_size: Annotated[int | None, typer.Option("--block-size", help="GPTQ: columns per lazy update.")] = None,
    dataset: Annotated[
        str | None, typer.Option("--dataset", "-d", help="GPTQ calibration text (as for calibrate).")
    ] = None,
    num_samples: Annotated[int | None, typer.Option("--num-samples", "-n", help="GPTQ: token windows.")] = None,
    seq_len: Annotated[int | None, typer.Option("--seq-len", help="GPTQ: tokens per window.")] = None,
    text_field: Annotated[str, typer.Option("--text-field", help="Field holding text in jsonl/parquet.")] = "text",
    all_experts: Annotated[
        bool, typer.Option("--all-experts", help="GPTQ: every token through every expert for the Hessians.")
    ] = False,
    min_expert_tokens: Annotated[
        int | None, typer.Option("--min-expert-tokens", help="GPTQ: blend Hessians of experts below this.")
    ] = None,
    device: Annotated[str, typer.Option("--device", help="GPTQ: cpu | cuda | auto.")] = "auto",
    output_format: Annotated[
        str, typer.Option("--format", help="auto | compressed-tensors | gptq-v1 (GPTQ) | ggml | gguf (kquant).")
    ] = "auto",
    max_memory: Annotated[
        str | None, typer.Option("--max-memory", help="GPTQ: memory for experts solved at once, e.g. 4GB.")
    ] = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Quantize MODEL into quantized safetensors (compressed-tensors, GPTQ v1 or ggml blocks) or a GGUF file,
    plus a quantkit report."""
    from quantkit import api
    from quantkit.model.checkpoint import resolve_model_path

    overrides = {"method": method, "bits": bits, "group_size": group_size, "granularity": granularity,
                 "range": range_mode, "clip": weight_clip, "percentile": percentile, "activations": activations,
                 "activation_range": range_method, "act_order": act_order or None,
                 "static_groups": static_groups or None, "symmetric": sym or None, "damp": damp,
                 "block_size": block_size, "ggml_type": ggml_type}
    chosen = build_recipe(preset, recipe, overrides, shared_experts_bits, ignore, shared_experts_type, dense_ffn_type)
    data = _gptq_settings(calibration, dataset, num_samples, seq_len, text_field, all_experts, min_expert_tokens,
                      resolve_device(device), trust_remote_code)
    if out is None:
        suffix = ".gguf" if output_format == "gguf" else ""
        out = Path(f"{resolve_model_path(model).name}-{_slug(chosen.default.describe())}{suffix}")
    options = api.QuantizeOptions(
        overwrite=overwrite,
        max_shard_bytes=parse_size(max_shard_size),
        seed=seed,
        calibration=calibration,
        data=data,
        output_format=output_format,
        max_memory=parse_size(max_memory) if max_memory is not None else None,
        command=["quantkit", *sys.argv[1:]],
        show_progress=not as_json,
        console=err_console,
    )
    report = api.quantize(model, chosen, out, options=options)
    if as_json:
        console.print_json(json.dumps(report.to_dict()))
    else:
        report.print_summary(console)
        console.print(f"wrote {out}")


@app.command()
@user_errors
def calibrate(
    model: ModelArg = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Calibration directory to write.")] = Path("calib"),
    dataset: Annotated[
        str | None,
        typer.Option("--dataset", "-d", help="Hub recipe (wikitext2, c4, ptb, pile-val; online) or a local "
                     "txt/jsonl/parquet file or folder; default: the bundled calibration_data/default."),
    ] = None,
    text_field: Annotated[str, typer.Option("--text-field", help="Field holding text in jsonl/parquet.")] = "text",
    split: Annotated[str | None, typer.Option("--split", help="Hub split (default: the recipe's).")] = None,
    num_samples: Annotated[int, typer.Option("--num-samples", "-n", help="Token windows to sample.")] = 128,
    seq_len: Annotated[
        int | None, typer.Option("--seq-len", help="Tokens per window; default min(2048, model context).")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed for sampling the windows.")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Windows per forward pass.")] = 4,
    all_experts: Annotated[
        bool, typer.Option("--all-experts", help="Every token through every expert, for statistics only.")
    ] = False,
    min_expert_tokens: Annotated[
        int, typer.Option("--min-expert-tokens", help="Flag experts observed on fewer tokens (fallback applies).")
    ] = 16,
    plot: Annotated[
        list[str] | None, typer.Option("--plot", help="Also plot these sites (glob, repeatable).")
    ] = None,
    imatrix_out: Annotated[
        Path | None, typer.Option("--imatrix-out", help="Also write a llama.cpp imatrix GGUF here.")
    ] = None,
    device: Annotated[str, typer.Option("--device", help="cpu | cuda | auto.")] = "auto",
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace a previous calibration directory (and --imatrix-out).")
    ] = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Run calibration text through MODEL one layer at a time; write per-site, per-expert statistics."""
    from quantkit.calib.run import CalibrationSettings
    from quantkit.calib.run import calibrate as run_calibration

    settings = CalibrationSettings(
        dataset=dataset, num_samples=num_samples, seq_len=seq_len, seed=seed, batch_size=batch_size,
        text_field=text_field, split=split, all_experts=all_experts, min_expert_tokens=min_expert_tokens,
        plot=tuple(plot or ()), device=resolve_device(device), trust_remote_code=trust_remote_code,
    )
    calibration = run_calibration(model, out, settings, imatrix_out=imatrix_out, overwrite=overwrite,
                                  command=["quantkit", *sys.argv[1:]], show_progress=not as_json,
                                  console=err_console)
    if as_json:
        console.print_json(json.dumps(calibration.metadata))
        return
    print_calibration(calibration.metadata)
    console.print(f"wrote {out}" + (f" and {imatrix_out}" if imatrix_out else ""))


def _gptq_settings(calibration: Path | None, dataset: str | None, num_samples: int | None, seq_len: int | None,
               text_field: str, all_experts: bool, min_expert_tokens: int | None, device: str,
               trust_remote_code: bool):  # -> settings
    """GPTQ's calibration windows from the options, or None to let ``quantize`` take the calibration's/defaults."""
    from dataclasses import replace

    from quantkit.calib.artifact import load_calibration
    from quantkit.calib.run import CalibrationSettings, settings_of

    if any(v is not None for v in (dataset, num_samples, seq_len, min_expert_tokens)) or all_experts:
        defaults = CalibrationSettings()
        return CalibrationSettings(
            dataset=dataset, num_samples=num_samples or defaults.num_samples, seq_len=seq_len, text_field=text_field,
            all_experts=all_experts, device=device, trust_remote_code=trust_remote_code,
            min_expert_tokens=defaults.min_expert_tokens if min_expert_tokens is None else min_expert_tokens,
        )
    if device == "cpu" and not trust_remote_code:
        return None
    base = (settings_of(load_calibration(calibration), trust_remote_code) if calibration is not None
            else CalibrationSettings(trust_remote_code=trust_remote_code))
    return replace(base, device=device)


eval_app = typer.Typer(help="Evaluate models: perplexity, divergence from a base model, regression gate.",
                       no_args_is_help=True)
app.add_typer(eval_app, name="eval")


@eval_app.command("perplexity")
@user_errors
def eval_perplexity(
    model: ModelArg = None,
    base: Annotated[
        str | None, typer.Option("--base", help="Float model to compare with: KL(base||model), top-1 agreement.")
    ] = None,
    dataset: Annotated[
        str, typer.Option("--dataset", "-d", help="wikitext2 | c4 | ptb (hub recipes, online) or a local file/folder.")
    ] = "wikitext2",
    text_field: Annotated[str, typer.Option("--text-field", help="Field holding text in jsonl/parquet.")] = "text",
    split: Annotated[str | None, typer.Option("--split", help="Hub split (default: the protocol's).")] = None,
    protocol: Annotated[str, typer.Option("--protocol", help="gptq | llamacpp (see docs/evaluation.md).")] = "gptq",
    seq_len: Annotated[
        int | None, typer.Option("--seq-len", help="Window length; default 2048 (gptq) or 512 (llamacpp).")
    ] = None,
    stride: Annotated[
        int | None, typer.Option("--stride", help="Sliding windows advancing by this many tokens.")
    ] = None,
    max_windows: Annotated[int | None, typer.Option("--max-windows", help="Evaluate only the first N.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Windows per forward pass.")] = 4,
    dtype: Annotated[str, typer.Option("--dtype", help="float32 | bfloat16 | float16.")] = "float32",
    device: Annotated[str, typer.Option("--device", help="cpu | cuda | auto.")] = "auto",
    save: Annotated[Path | None, typer.Option("--save", help="Write the results JSON here.")] = None,
    baseline: Annotated[
        Path | None, typer.Option("--baseline", help="Results JSON to compare with (from --save).")
    ] = None,
    max_increase: Annotated[
        str | None, typer.Option("--max-increase", help="Exit 1 if perplexity rises more than this, e.g. 2%.")
    ] = None,
    max_kl: Annotated[float | None, typer.Option("--max-kl", help="Exit 1 if KL(base||model) exceeds this.")] = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Perplexity of MODEL (default: the demo model) under a published protocol; exit 1 on regression."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from quantkit.eval.run import EvalSettings, check_regression, run_perplexity, save_results

    increase = parse_percent(max_increase) if max_increase is not None else None
    settings = EvalSettings(dataset=dataset, protocol=protocol, seq_len=seq_len, stride=stride,
                            max_windows=max_windows, batch_size=batch_size, text_field=text_field, split=split,
                            dtype=dtype, device=resolve_device(device), trust_remote_code=trust_remote_code)
    columns = (TextColumn("evaluating"), BarColumn(), MofNCompleteColumn(), TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=err_console, transient=True, disable=as_json) as progress:
        task = progress.add_task("eval", total=None)

        def on_progress(advance: int = 0, total: int | None = None) -> None:
            if total is not None:
                progress.update(task, total=total)
            progress.advance(task, advance)

        result = run_perplexity(model, settings, base=base, on_progress=on_progress)
    verdict = check_regression(result, baseline, increase, max_kl)
    result["gate"] = {"baseline": str(baseline) if baseline else None, "max_increase": increase,
                      "max_kl": max_kl, "passed": verdict is None}
    if save is not None:
        save_results(save, result)
    if as_json:
        console.print_json(json.dumps(result))
    else:
        print_eval(result)
    if verdict is not None:
        err_console.print(verdict, highlight=False, soft_wrap=True)
        raise typer.Exit(1)


def parse_percent(text: str) -> float:
    """``"2%"`` or ``"2"`` -> 0.02."""
    try:
        value = float(text.strip().removesuffix("%"))
    except ValueError:
        raise QuantkitError(f"invalid percentage {text!r}; use e.g. 2%") from None
    if value < 0:
        raise QuantkitError(f"--max-increase must not be negative, got {text!r}")
    return value / 100


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise QuantkitError(f"--device must be auto, cpu or cuda, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise QuantkitError("--device cuda, but no CUDA device is available")
    return device


@app.command()
@user_errors
def presets(
    name: Annotated[str | None, typer.Argument(help="A k-quant preset to show rule by rule, e.g. Q4_K_M.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List the named recipes and the k-quant presets with their llama.cpp tensor-type rules."""
    from quantkit.kquants.preset_sizes import preset_summaries
    from quantkit.kquants.presets import KQUANT_PRESETS, preset_rules
    from quantkit.recipe import PRESET_DESCRIPTIONS, PRESETS

    if name is not None:
        type_rules = preset_rules(name)
        if as_json:
            console.print_json(json.dumps([{"tensors": t, "type": r} for t, r in type_rules]))
            return
        print_preset_rules(name, type_rules)
        return
    if as_json:
        console.print_json(json.dumps({"recipes": {n: r.to_dict() for n, r in PRESETS.items()},
                                       "kquant": {n: dict(preset_rules(n)) for n in KQUANT_PRESETS}}))
        return
    print_presets(PRESETS, PRESET_DESCRIPTIONS, preset_summaries())


def parse_size(text: str) -> int:
    """``"2GB"`` -> bytes (decimal units KB/MB/GB, binary KiB/MiB/GiB)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", text, re.IGNORECASE)
    if not match:
        raise QuantkitError(f"invalid size {text!r}; use e.g. 2GB or 500MB")
    units = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
    size = int(float(match[1]) * units[(match[2] or "B").lower()])
    if size <= 0:
        raise QuantkitError(f"shard size must be positive, got {text!r}")
    return size


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
