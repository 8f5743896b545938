"""Determinism: the same inputs, options and seed give byte-identical files, for every method, format and command.

Each case writes everything under one directory ``{root}``; :func:`snapshot` takes the sha256 of every file
there, except that quantkit's JSON outputs (report, calibration.json, eval results) are compared parsed,
without the fields ``quantkit.report.volatile`` lists (timings, paths, versions, peak memory), which is the one
place that says what may differ. A case runs twice in this process, with torch's global random state
disturbed in between (so the second run follows the first: caches filled, RNG consumed), and the cases
marked ``fresh`` once more in a new process through the CLI. ``test_byte_identity.py`` pins the bytes to a
committed manifest; this file checks that nothing outside the inputs moves them, including the cases whose
bytes depend on this machine's float kernels. The slow sweep repeats every case of the byte-identity harness
in a fresh process. What a different thread count or device changes: docs/determinism.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load
from typer.testing import CliRunner

from quantkit.cli import app
from quantkit.model.checkpoint import DEMO_MODEL_DIR
from quantkit.outputs import CALIBRATION_FILE, REPORT_FILE, save_safetensors
from quantkit.report.volatile import CALIBRATION_VOLATILE, EVAL_VOLATILE, REPORT_VOLATILE, without_volatile
from tests.test_byte_identity import CALIB_WINDOWS, CASES

REPO = Path(__file__).resolve().parents[1]
RESULTS_FILE = "results.json"  # where the eval cases --save
TEXT_WINDOWS = ("--dataset", "{text}", "--num-samples", "4", "--seq-len", "32")  # the tiny LM's calibration text


@dataclass(frozen=True)
class Run:
    """One CLI command; ``{root}`` (its output directory), ``{text}``, ``{base}``, ``{calibration}`` (the demo
    model's), ``{lm_calibration}`` (the tiny LM's) are filled in."""

    args: tuple[str, ...]
    model: str = "demo"  # "demo", "lm" (the tiny DeepSeek-V3 with a tokenizer) or a tiny model's type
    fresh: bool = False  # also run it in a new process


QUANTIZE_OUT = ("--out", "{root}/out")
GGUF_OUT = ("--out", "{root}/out.gguf")
RUNS: dict[str, Run] = {
    "absmax-w4-g32": Run(("quantize", "--method", "absmax", "--bits", "4", "--group-size", "32", *QUANTIZE_OUT)),
    "zeropoint-w3-g16-mse": Run(("quantize", "--method", "zeropoint", "--bits", "3", "--group-size", "16",
                                 "--weight-clip", "mse", *QUANTIZE_OUT), model="lm"),
    **{f"w8a8-static-{method}": Run(("quantize", "--method", "absmax", "--bits", "8", "--activations", "static",
                                     "--range-method", method, "--calibration", "{lm_calibration}", *QUANTIZE_OUT),
                                    model="lm") for method in ("percentile", "mse", "kl")},
    "ternary-a8-dynamic": Run(("quantize", "--method", "ternary", "--activations", "dynamic", *QUANTIZE_OUT)),
    "fp16": Run(("quantize", "--preset", "fp16", *QUANTIZE_OUT)),
    "bf16": Run(("quantize", "--preset", "bf16", *QUANTIZE_OUT)),
    "kquant-Q4_K-ggml": Run(("quantize", "--method", "kquant", "--type", "Q4_K", "--format", "ggml", *QUANTIZE_OUT)),
    "preset-Q4_K_M-importance-gguf": Run(("quantize", "--preset", "Q4_K_M", "--calibration", "{calibration}",
                                          "--format", "gguf", *GGUF_OUT), fresh=True),
    "gptq-w4-g16-act-order": Run(("quantize", "--method", "gptq", "--bits", "4", "--group-size", "16", "--act-order",
                                  *TEXT_WINDOWS, *QUANTIZE_OUT), model="lm", fresh=True),
    "gptq-v1-w4-g16": Run(("quantize", "--method", "gptq", "--bits", "4", "--group-size", "16", "--format", "gptq-v1",
                           *TEXT_WINDOWS, *QUANTIZE_OUT), model="lm"),
    "calibrate-imatrix-plots": Run(("calibrate", *TEXT_WINDOWS, "--plot", "*layers.0.*", "--imatrix-out",
                                    "{root}/imatrix.gguf", "--out", "{root}/calib"), model="lm", fresh=True),
    "eval-perplexity-kl": Run(("eval", "perplexity", "--base", "{base}", "--dataset", "{text}", "--seq-len", "32",
                               "--save", "{root}/" + RESULTS_FILE), model="lm"),
}
VOLATILE_BY_FILE = {REPORT_FILE: REPORT_VOLATILE, CALIBRATION_FILE: CALIBRATION_VOLATILE, RESULTS_FILE: EVAL_VOLATILE}


def sweep_run(name: str) -> Run:
    """The byte-identity harness's case ``name`` as a Run."""
    case = CASES[name]
    out = GGUF_OUT if case.gguf else QUANTIZE_OUT
    calibration = ("--calibration", "{calibration}") if case.calibrated else ()
    return Run(("quantize", *case.args, *calibration, *out), model=case.model, fresh=True)


def snapshot(root: Path) -> dict[str, Any]:
    """Every file under ``root``: quantkit's JSON outputs parsed without their volatile fields, others' sha256."""
    files: dict[str, Any] = {}
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        volatile = next((v for suffix, v in VOLATILE_BY_FILE.items() if file.name.endswith(suffix)), None)
        data = file.read_bytes()
        name = str(file.relative_to(root))
        if volatile is not None:
            files[name] = without_volatile(json.loads(data), volatile)
        elif file.suffix == ".safetensors":  # per tensor too, so that a difference names its tensors
            tensors = {key: hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
                       for key, t in load(data).items()}
            files[name] = {"sha256": hashlib.sha256(data).hexdigest(), "tensors": tensors}
        else:
            files[name] = hashlib.sha256(data).hexdigest()
    return files


def differences(first: Any, second: Any, where: str = "") -> list[str]:
    """The paths (``file.key[i]``) at which two snapshots differ."""
    if isinstance(first, dict) and isinstance(second, dict):
        return [d for key in sorted(first.keys() | second.keys(), key=str)
                for d in differences(first.get(key), second.get(key), f"{where}.{key}" if where else str(key))]
    if isinstance(first, list) and isinstance(second, list) and len(first) == len(second):
        pairs = enumerate(zip(first, second, strict=True))
        return [d for i, (a, b) in pairs for d in differences(a, b, f"{where}[{i}]")]
    return [] if first == second else [where]


class Inputs:
    """Fills a Run's placeholders and names its model."""

    def __init__(self, tiny_models: dict[str, Path], tiny_lm: Path, test_text: Path, calibrations: Path) -> None:
        self.models = {"demo": DEMO_MODEL_DIR, "lm": tiny_lm, **tiny_models}
        self.values = {"text": str(test_text), "base": str(tiny_models["deepseek_v3"]),
                       "calibration": str(calibrations / "demo"), "lm_calibration": str(calibrations / "lm")}

    def argv(self, run: Run, root: Path) -> list[str]:
        command = 2 if run.args[0] == "eval" else 1
        fill = {**self.values, "root": str(root)}
        return [*run.args[:command], str(self.models[run.model]), *(a.format(**fill) for a in run.args[command:])]


def run_here(inputs: Inputs, run: Run, root: Path) -> dict[str, Any]:
    root.mkdir(parents=True)
    result = CliRunner().invoke(app, inputs.argv(run, root))
    assert result.exit_code == 0, result.stderr
    return snapshot(root)


def run_fresh(inputs: Inputs, run: Run, root: Path) -> dict[str, Any]:
    """``run`` in a new Python process, through the CLI, with this process's thread count."""
    root.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH")))),
           "OMP_NUM_THREADS": str(torch.get_num_threads())}
    done = subprocess.run([sys.executable, "-c", "from quantkit.cli import app; app()", *inputs.argv(run, root)],
                          env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return snapshot(root)


def assert_same(name: str, first: dict[str, Any], second: dict[str, Any]) -> None:
    assert first, f"{name} wrote nothing"
    changed = differences(first, second)
    assert not changed, f"{name}: these differ between identical runs: {changed[:20]}"


@pytest.fixture(scope="module")
def inputs(tiny_models: dict[str, Path], tiny_lm: Path, test_text: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    calibrations = tmp_path_factory.mktemp("calibrations")
    for args in (["calibrate", *CALIB_WINDOWS, "--out", str(calibrations / "demo")],
                 ["calibrate", str(tiny_lm), *(a.format(text=test_text) for a in TEXT_WINDOWS),
                  "--out", str(calibrations / "lm")]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.stderr
    return Inputs(tiny_models, tiny_lm, test_text, calibrations)


def disturb_global_state() -> None:
    """What an earlier run in the same process may leave behind: torch's global generator moved on."""
    torch.manual_seed(987654321)
    torch.rand(17)


@pytest.mark.parametrize("name", list(RUNS))
def test_a_second_run_in_the_same_process_writes_the_same_bytes(name: str, inputs: Inputs, tmp_path: Path) -> None:
    first = run_here(inputs, RUNS[name], tmp_path / "first")
    disturb_global_state()
    assert_same(name, first, run_here(inputs, RUNS[name], tmp_path / "second"))


@pytest.mark.parametrize("name", [name for name, run in RUNS.items() if run.fresh])
def test_a_fresh_process_writes_the_same_bytes(name: str, inputs: Inputs, tmp_path: Path) -> None:
    assert_same(name, run_here(inputs, RUNS[name], tmp_path / "here"),
                run_fresh(inputs, RUNS[name], tmp_path / "fresh"))


def test_the_volatile_fields_are_the_only_differences(inputs: Inputs, tmp_path: Path) -> None:
    """Two GPTQ runs' raw reports differ (paths, timings), and only in fields the volatile list names."""
    run = RUNS["gptq-v1-w4-g16"]
    reports = [json.loads((tmp_path / root / "out" / REPORT_FILE).read_text())
               for root in ("a", "b") if run_here(inputs, run, tmp_path / root)]
    raw = differences(*reports)
    assert any(path.startswith("totals.wall_time_s") for path in raw) and "output" in raw
    unlisted = [path for path in raw if not set(path.replace("[", ".").split(".")) & REPORT_VOLATILE.keys()]
    assert not unlisted, f"fields that vary between identical runs but are not in REPORT_VOLATILE: {unlisted}"


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_every_byte_identity_case_is_the_same_in_a_fresh_process(name: str, inputs: Inputs, tmp_path: Path) -> None:
    run = sweep_run(name)
    first = run_here(inputs, run, tmp_path / "first")
    disturb_global_state()
    assert_same(name, first, run_here(inputs, run, tmp_path / "second"))
    assert_same(name, first, run_fresh(inputs, run, tmp_path / "fresh"))


def test_safetensors_metadata_is_written_in_one_order(tmp_path: Path) -> None:
    """safetensors writes ``__metadata__`` in a random order per save; quantkit's writer sorts it (same bytes)."""
    metadata = {"version": "1", "format": "quantkit-calibration", "quoted \"ü\"": "a\nb", "z": ""}
    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([7], dtype=torch.int64)}
    digests = set()
    for i in range(12):
        path = tmp_path / f"{i}.safetensors"
        save_safetensors(tensors, path, metadata)
        digests.add(hashlib.sha256(path.read_bytes()).hexdigest())
        with safe_open(str(path), "pt") as file:
            assert file.metadata() == metadata
            assert all(torch.equal(file.get_tensor(k), v) for k, v in tensors.items())
    assert len(digests) == 1
    header = path.read_bytes()[8:]
    assert header.startswith(b'{"__metadata__":{"format":"quantkit-calibration","quoted')
