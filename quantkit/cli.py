"""The ``quantkit`` command line: parses and validates options, calls :mod:`quantkit.api`, prints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from quantkit.cli_errors import user_errors
from quantkit.cli_groups import option_groups
from quantkit.cli_options import (
    CalibrationDataOptions,
    DeviceOpt,
    EvalModelArg,
    EvalOptions,
    JsonOpt,
    ModelArg,
    OutputOptions,
    QuantizeDataOptions,
    TrustRemoteCodeOpt,
    quantize_options,
)
from quantkit.cli_output import (
    console,
    err_console,
    print_calibration,
    print_eval,
    print_inspection,
    print_preset_rules,
    print_presets,
)
from quantkit.cli_recipe import GptqOptions, KquantOptions, RangeOptions, RecipeOptions, SchemeOptions, build_recipe
from quantkit.cli_values import command_line, parse_percent

app = typer.Typer(
    name="quantkit",
    help="Post-training quantization for Hugging Face Mixture-of-Experts models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.command()
@option_groups()
@user_errors
def inspect(
    model: ModelArg = None,
    *,
    scheme: SchemeOptions,
    source: RecipeOptions,
    kquant: KquantOptions,
    as_json: JsonOpt = False,
) -> None:
    """Architecture, layers, experts (routed/shared), parameters, and what the recipe would do."""
    from quantkit import api  # deferred: the API pulls in torch; --help stays fast

    info = api.inspect(model, build_recipe(source, kquant, scheme))
    if as_json:
        console.print_json(json.dumps(info))
        return
    print_inspection(info)


@app.command()
@option_groups(panels=True)
@user_errors
def quantize(
    model: ModelArg = None,
    *,
    source: RecipeOptions,
    scheme: SchemeOptions,
    ranges: RangeOptions,
    kquant: KquantOptions,
    gptq: GptqOptions,
    data: QuantizeDataOptions,
    output: OutputOptions,
    seed: Annotated[int, typer.Option("--seed", help="Random seed (recorded in the report).")] = 0,
    trust_remote_code: TrustRemoteCodeOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Quantize MODEL into quantized safetensors (compressed-tensors, GPTQ v1 or ggml blocks) or a GGUF file,
    plus a quantkit report."""
    from quantkit import api  # deferred: the API pulls in torch; --help stays fast

    recipe = build_recipe(source, kquant, scheme, ranges, gptq)
    out, options = quantize_options(model, recipe, output, data, gptq, seed=seed,
                                    trust_remote_code=trust_remote_code, show_progress=not as_json)
    report = api.quantize(model, recipe, out, options=options)
    if as_json:
        console.print_json(json.dumps(report.to_dict()))
    else:
        report.print_summary(console)
        console.print(f"wrote {out}")


@app.command()
@option_groups()
@user_errors
def calibrate(
    model: ModelArg = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Calibration directory to write.")] = Path("calib"),
    *,
    data: CalibrationDataOptions,
    imatrix_out: Annotated[
        Path | None, typer.Option("--imatrix-out", help="Also write a llama.cpp imatrix GGUF here.")
    ] = None,
    device: DeviceOpt = "auto",
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace a previous calibration directory (and --imatrix-out).")
    ] = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Run calibration text through MODEL one layer at a time; write per-site, per-expert statistics."""
    from quantkit.calib.run import calibrate as run_calibration  # deferred: the API pulls in torch; --help stays fast

    settings = data.settings(device, trust_remote_code)
    calibration = run_calibration(model, out, settings, imatrix_out=imatrix_out, overwrite=overwrite,
                                  command=command_line(), show_progress=not as_json, console=err_console)
    if as_json:
        console.print_json(json.dumps(calibration.metadata))
        return
    print_calibration(calibration.metadata)
    console.print(f"wrote {out}" + (f" and {imatrix_out}" if imatrix_out else ""))


eval_app = typer.Typer(help="Evaluate models: perplexity, divergence from a base model, regression gate.",
                       no_args_is_help=True)
app.add_typer(eval_app, name="eval")


@eval_app.command("perplexity")
@option_groups()
@user_errors
def eval_perplexity(
    model: EvalModelArg = None,
    base: Annotated[
        str | None, typer.Option("--base", help="Float model (directory or GGUF) to compare with: KL(base||model), "
                                                "top-1 agreement.")
    ] = None,
    *,
    evaluation: EvalOptions,
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
    # deferred, like every import below the command line: --help stays fast
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from quantkit.eval.run import check_regression, run_perplexity, save_results

    increase = parse_percent(max_increase) if max_increase is not None else None
    settings = evaluation.settings(trust_remote_code)
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


@app.command()
@user_errors
def presets(
    name: Annotated[str | None, typer.Argument(help="A k-quant preset to show rule by rule, e.g. Q4_K_M.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List the named recipes and the k-quant presets with their llama.cpp tensor-type rules."""
    from quantkit.kquants.preset_sizes import preset_summaries  # deferred: the API pulls in torch; --help stays fast
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
