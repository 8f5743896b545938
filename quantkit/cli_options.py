"""The command line's options, each declared once, in groups that each become one object of the API.

A command takes a group (an :class:`~quantkit.cli_groups.OptionGroup`, a dataclass whose fields are the
options) as one parameter (:func:`~quantkit.cli_groups.option_groups`). Each group turns into what the API
takes by one function: the recipe (:func:`quantkit.cli_recipe.build_recipe`, with the scheme's options),
``QuantizeOptions`` (:func:`quantize_options`), ``CalibrationSettings`` and ``EvalSettings``.
:mod:`quantkit.cli` holds the commands: parse, build, call the API, print.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from quantkit.cli_groups import OptionGroup
from quantkit.cli_output import err_console
from quantkit.cli_values import command_line, parse_size, resolve_device

if TYPE_CHECKING:  # imported when used, to keep --help fast
    from quantkit.api import QuantizeOptions
    from quantkit.calib.run import CalibrationSettings
    from quantkit.cli_recipe import GptqOptions
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
