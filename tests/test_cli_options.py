"""The CLI's option groups: command-line defaults are the API's, quantize's --help has panels, names are unique."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from quantkit.api import QuantizeOptions
from quantkit.calib.run import CalibrationSettings
from quantkit.cli import app
from quantkit.cli_groups import OptionGroup, option_groups
from quantkit.eval.run import EvalSettings

runner = CliRunner()


class Captured(Exception):
    """Raised by a stand-in for the API: the command got as far as calling it, with these arguments."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self.arguments, self.kwargs = args, kwargs


def capture(*args: Any, **kwargs: Any) -> Any:
    raise Captured(*args, **kwargs)


def invoke_captured(*args: str) -> Captured:
    result = runner.invoke(app, list(args))
    assert isinstance(result.exception, Captured), (result.exit_code, result.output)
    return result.exception


def test_quantize_defaults_are_the_api_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("quantkit.api.quantize", capture)
    options = invoke_captured("quantize", "--device", "cpu").kwargs["options"]
    assert dataclasses.replace(options, command=None, console=None) == QuantizeOptions()


def test_quantize_gptq_data_defaults_are_the_api_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("quantkit.api.quantize", capture)
    options = invoke_captured("quantize", "--device", "cpu", "--dataset", "text.txt").kwargs["options"]
    assert options.data == CalibrationSettings(dataset="text.txt")


def test_calibrate_defaults_are_the_api_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("quantkit.calib.run.calibrate", capture)
    settings = invoke_captured("calibrate", "--device", "cpu").arguments[2]
    assert settings == CalibrationSettings()


def test_eval_perplexity_defaults_are_the_api_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("quantkit.eval.run.run_perplexity", capture)
    settings = invoke_captured("eval", "perplexity", "--device", "cpu").arguments[1]
    assert settings == EvalSettings()


def test_quantize_help_groups_options_into_panels() -> None:
    command = typer.main.get_command(app).commands["quantize"]  # type: ignore[attr-defined]
    panels: dict[str | None, list[str]] = {}
    for param in command.params:
        panels.setdefault(getattr(param, "rich_help_panel", None), []).append(param.opts[0])
    assert list(panels) == [None, "Recipe", "Scheme", "k-quant", "GPTQ", "Calibration data", "Output"]
    assert panels[None] == ["model", "--seed", "--trust-remote-code", "--json"]
    assert "--max-memory" in panels["GPTQ"] and "--calibration" in panels["Calibration data"]
    result = runner.invoke(app, ["quantize", "--help"])
    assert result.exit_code == 0
    for panel in ("Recipe", "Scheme", "k-quant", "GPTQ", "Calibration data", "Output"):
        assert f"─ {panel} ─" in result.output


def test_other_commands_keep_one_options_panel() -> None:
    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    for command in (commands["inspect"], commands["calibrate"], commands["eval"].commands["perplexity"]):
        assert {getattr(param, "rich_help_panel", None) for param in command.params} == {None}


@dataclasses.dataclass(frozen=True)
class Seeded(OptionGroup):
    panel = "Seeded"
    seed: int = 0


def test_option_groups_refuse_an_option_name_used_twice() -> None:
    def command(*, group: Seeded, seed: int = 0) -> None:
        pass

    with pytest.raises(TypeError, match="used twice"):
        option_groups()(command)


@pytest.mark.parametrize(("args", "message"), [
    (("--preset", "Q4_K_M", "--bits", "4", "--group-size", "32"), "--bits, --group-size do not apply to method kquant"),
    (("--method", "absmax", "--act-order"), "--act-order does not apply to method absmax"),
    (("--method", "zeropoint", "--range", "full"), "--range does not apply to method zeropoint"),
    (("--method", "kquant", "--type", "Q4_K", "--weight-clip", "mse"), "--weight-clip does not apply to method kquant"),
    (("--preset", "Q4_K_M", "--shared-experts-bits", "8"),
     "--shared-experts-bits applies to integer methods, not kquant (use --shared-experts-type)"),
])
def test_options_of_another_method_are_refused_by_flag(args: tuple[str, ...], message: str) -> None:
    result = runner.invoke(app, ["quantize", *args, "--out", "unused"])
    assert result.exit_code == 2 and result.stderr.strip() == f"error: {message}", result.stderr
