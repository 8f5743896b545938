"""Byte-identity harness: the sha256 of every file each method x format writes, against a committed manifest.

Restructuring code must not change what quantkit writes. Each case below runs the CLI (the surface that
stays stable while the code behind it moves) on the demo model or a tiny model of every architecture,
then hashes every written file; the report is hashed with its run-specific fields (paths, timings,
versions, command line: ``quantkit.report.volatile.REPORT_VOLATILE``) removed.
``tests/golden/output_manifest.json`` holds the hashes.

Cases that involve forward passes (GPTQ, calibration statistics, static activation scales, k-quant
importance) depend on the float kernels of the machine; the manifest records the torch version and the
CPU capability they were made with, and those cases are skipped with a reason elsewhere. Cases that are
element-wise (round-to-nearest, casts, k-quants without importance) are checked everywhere.

Regenerate deliberately, before a restructure on the machine that will run it, or after a change that is
meant to move bytes (say which and why in the commit):
    QUANTKIT_UPDATE_MANIFEST=1 pytest tests/test_byte_identity.py
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from quantkit.cli import app
from quantkit.model.checkpoint import DEMO_MODEL_DIR
from quantkit.report.volatile import without_volatile
from tests.conftest import ARCH_CONFIGS

MANIFEST = Path(__file__).parent / "golden" / "output_manifest.json"
UPDATE = os.environ.get("QUANTKIT_UPDATE_MANIFEST") == "1"
CALIB_WINDOWS = ("--num-samples", "8", "--seq-len", "64")  # the bundled calibration text
GGUF_ARCHS = ("llama", "deepseek_v2", "deepseek_v3", "qwen2_moe")


@dataclass(frozen=True)
class Case:
    """One CLI run: ``model`` is "demo" or a tiny model's type; ``numeric`` if forward passes shape its bytes."""

    model: str
    args: tuple[str, ...]
    numeric: bool = False
    calibrated: bool = False  # pass the demo model's calibration directory
    gguf: bool = False  # --out is one file


DEMO_CASES: dict[str, Case] = {
    "absmax-w8": Case("demo", ("--method", "absmax", "--bits", "8")),
    "absmax-w4-g32-full": Case("demo", ("--method", "absmax", "--bits", "4", "--group-size", "32", "--range", "full")),
    "zeropoint-w4-g64": Case("demo", ("--method", "zeropoint", "--bits", "4", "--group-size", "64")),
    "zeropoint-w3-g32-mse": Case("demo", ("--method", "zeropoint", "--bits", "3", "--group-size", "32",
                                          "--weight-clip", "mse")),
    "absmax-w8-percentile": Case("demo", ("--method", "absmax", "--bits", "8", "--weight-clip", "percentile")),
    "absmax-w8a8-dynamic": Case("demo", ("--method", "absmax", "--bits", "8", "--activations", "dynamic")),
    "absmax-w8a8-static-kl": Case("demo", ("--method", "absmax", "--bits", "8", "--activations", "static",
                                           "--range-method", "kl"), numeric=True, calibrated=True),
    "int4-g128-moe-shared8": Case("demo", ("--preset", "int4-g128-moe", "--group-size", "64",
                                           "--shared-experts-bits", "8", "--max-shard-size", "2MB")),
    "fp16": Case("demo", ("--preset", "fp16")),
    "bf16-ignore-layer0": Case("demo", ("--preset", "bf16", "--ignore", r"re:.*layers\.0\..*")),
    "gptq-w4-g32": Case("demo", ("--method", "gptq", "--bits", "4", "--group-size", "32", *CALIB_WINDOWS),
                        numeric=True),
    "gptq-w3-g32-act-order": Case("demo", ("--method", "gptq", "--bits", "3", "--group-size", "32", "--act-order",
                                           *CALIB_WINDOWS), numeric=True),
    "gptq-w4-g32-sym-static-groups": Case("demo", ("--method", "gptq", "--bits", "4", "--group-size", "32", "--sym",
                                                   "--act-order", "--static-groups", *CALIB_WINDOWS), numeric=True),
    "gptq-v1-w4-g32": Case("demo", ("--method", "gptq", "--bits", "4", "--group-size", "32", "--format", "gptq-v1",
                                    *CALIB_WINDOWS), numeric=True),
    "gptq-v1-w4-g32-act-order": Case("demo", ("--method", "gptq", "--bits", "4", "--group-size", "32", "--act-order",
                                              "--format", "gptq-v1", *CALIB_WINDOWS), numeric=True),
    "kquant-Q8_0": Case("demo", ("--method", "kquant", "--type", "Q8_0")),
    "kquant-Q2_K": Case("demo", ("--method", "kquant", "--type", "Q2_K")),
    "kquant-Q3_K": Case("demo", ("--method", "kquant", "--type", "Q3_K")),
    "kquant-Q4_K": Case("demo", ("--method", "kquant", "--type", "Q4_K")),
    "kquant-Q5_K": Case("demo", ("--method", "kquant", "--type", "Q5_K")),
    "kquant-Q6_K": Case("demo", ("--method", "kquant", "--type", "Q6_K")),
    "kquant-Q4_0": Case("demo", ("--method", "kquant", "--type", "Q4_0")),
    "kquant-Q5_0": Case("demo", ("--method", "kquant", "--type", "Q5_0")),
    "kquant-Q4_1": Case("demo", ("--method", "kquant", "--type", "Q4_1")),
    "kquant-Q5_1": Case("demo", ("--method", "kquant", "--type", "Q5_1")),
    "preset-Q4_K_M": Case("demo", ("--preset", "Q4_K_M")),
    "preset-Q3_K_S-shared-Q6_K": Case("demo", ("--preset", "Q3_K_S", "--shared-experts-type", "Q6_K",
                                               "--dense-ffn-type", "Q8_0")),
    "preset-Q4_K_M-importance": Case("demo", ("--preset", "Q4_K_M"), numeric=True, calibrated=True),
    "preset-Q2_K-importance": Case("demo", ("--preset", "Q2_K"), numeric=True, calibrated=True),
    "kquant-TQ1_0": Case("demo", ("--method", "kquant", "--type", "TQ1_0")),
    "kquant-TQ2_0": Case("demo", ("--method", "kquant", "--type", "TQ2_0")),
    "ternary": Case("demo", ("--method", "ternary")),
    "ternary-g64-a8-dynamic": Case("demo", ("--method", "ternary", "--group-size", "64", "--activations", "dynamic")),
    "gguf-Q4_K_M": Case("demo", ("--preset", "Q4_K_M", "--format", "gguf"), gguf=True),
    "gguf-kquant-TQ2_0": Case("demo", ("--method", "kquant", "--type", "TQ2_0", "--format", "gguf"), gguf=True),
    "gguf-ternary": Case("demo", ("--method", "ternary", "--format", "gguf"), gguf=True),
    "gguf-ternary-channel-TQ1_0": Case("demo", ("--method", "ternary", "--granularity", "channel", "--type", "TQ1_0",
                                                "--format", "gguf"), gguf=True),
    "gguf-Q6_K-importance": Case("demo", ("--preset", "Q6_K", "--format", "gguf"), numeric=True, calibrated=True,
                                 gguf=True),
}
TINY_CASES: dict[str, Case] = {
    **{f"{arch}-absmax-w4-g16": Case(arch, ("--method", "absmax", "--bits", "4", "--group-size", "16"))
       for arch in ARCH_CONFIGS},
    **{f"{arch}-zeropoint-w8": Case(arch, ("--method", "zeropoint", "--bits", "8")) for arch in ARCH_CONFIGS},
    **{f"{arch}-kquant-Q8_0": Case(arch, ("--method", "kquant", "--type", "Q8_0")) for arch in ARCH_CONFIGS},
    **{f"{arch}-gguf-Q8_0": Case(arch, ("--method", "kquant", "--type", "Q8_0", "--format", "gguf"), gguf=True)
       for arch in GGUF_ARCHS},
}
CASES = {**DEMO_CASES, **TINY_CASES}


def machine() -> dict[str, str]:
    """What the float kernels behind the numeric cases depend on."""
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def file_hashes(out: Path, gguf: bool) -> dict[str, str]:
    """sha256 of every file written (``out`` and, for GGUF, its report beside it); reports normalised."""
    files = [out, out.with_name(out.stem + ".quantkit_report.json")] if gguf else sorted(out.rglob("*"))
    hashes = {}
    for file in files:
        if not file.is_file():
            continue
        name = file.name if gguf else str(file.relative_to(out))
        data = file.read_bytes()
        if file.name.endswith("quantkit_report.json"):
            data = json.dumps(without_volatile(json.loads(data)), sort_keys=True).encode()
        hashes[name] = hashlib.sha256(data).hexdigest()
    return hashes


def run_case(case: Case, models: dict[str, Path], calibration: Path, out: Path) -> dict[str, str]:
    model = DEMO_MODEL_DIR if case.model == "demo" else models[case.model]
    args = ["quantize", str(model), *case.args, "--out", str(out)]
    if case.calibrated:
        args += ["--calibration", str(calibration)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.stderr
    return file_hashes(out, case.gguf)


@pytest.fixture(scope="module")
def demo_calibration(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("calibration") / "calib"
    result = CliRunner().invoke(app, ["calibrate", *CALIB_WINDOWS, "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def manifest() -> dict[str, Any]:
    if not MANIFEST.is_file():
        return {"machine": machine(), "cases": {}}
    return json.loads(MANIFEST.read_text())


@pytest.fixture(scope="module", autouse=True)
def write_manifest(manifest: dict[str, Any]) -> Any:
    yield
    if UPDATE:
        manifest["machine"] = machine()
        manifest["cases"] = dict(sorted(manifest["cases"].items()))
        MANIFEST.write_text(json.dumps(manifest, indent=1) + "\n")


@pytest.mark.parametrize("name", list(CASES))
def test_output_bytes_match_the_manifest(name: str, tiny_models: dict[str, Path], demo_calibration: Path,
                                         manifest: dict[str, Any], tmp_path: Path) -> None:
    case = CASES[name]
    if not UPDATE and case.numeric and manifest["machine"] != machine():
        pytest.skip(f"{name} depends on float kernels; manifest made with {manifest['machine']}, this is {machine()}")
    out = tmp_path / ("out.gguf" if case.gguf else "out")
    hashes = run_case(case, tiny_models, demo_calibration, out)
    if UPDATE:
        manifest["cases"][name] = hashes
        return
    assert name in manifest["cases"], f"{name} is not in {MANIFEST.name}: regenerate it (see the module doc)"
    expected = manifest["cases"][name]
    changed = sorted(f for f in expected.keys() | hashes.keys() if expected.get(f) != hashes.get(f))
    assert not changed, f"{name}: these files changed: {changed}"


def test_the_manifest_lists_every_case(manifest: dict[str, Any]) -> None:
    if UPDATE:
        pytest.skip("regenerating")
    assert sorted(manifest["cases"]) == sorted(CASES)
