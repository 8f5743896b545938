"""``--method ternary --format gguf``: ternary weights as ggml's TQ2_0/TQ1_0, exact on a model trained ternary.

The file is read back with the ``gguf`` package (its own TQ decoders) and its blocks are compared with ggml's
C encoder (``tests/ggml_reference.py``) on the same float input, byte for byte.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from typer.testing import CliRunner

from quantkit.cli import app
from quantkit.errors import QuantkitError
from quantkit.formats.gguf import GgufLayout
from quantkit.formats.output import OUTPUT_FORMATS
from quantkit.model.checkpoint import Checkpoint
from quantkit.plan import make_plan
from quantkit.recipe import Recipe
from quantkit.schemes import make_config
from tests.ggml_reference import reference

runner = CliRunner()


def run(*args: str | Path) -> tuple[int, str, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize("type_args, type_name", [((), "TQ2_0"), (("--type", "TQ1_0"), "TQ1_0")])
def test_bitnet_model_is_stored_exactly(bitnet_model: Path, tmp_path: Path, type_args: tuple[str, ...],
                                        type_name: str) -> None:
    out = tmp_path / "bitnet.gguf"
    code, stdout, err = run("quantize", bitnet_model, "--method", "ternary", *type_args, "--format", "gguf",
                            "--out", out)
    assert code == 0, err
    assert "destroys" not in stdout
    layout = GgufLayout(make_plan(Checkpoint.open(bitnet_model), Recipe(make_config("ternary"))))
    planned = {t.name: t for t in layout.tensors}
    ref = reference()
    ternary = 0
    for tensor in gguf.GGUFReader(out).tensors:
        if tensor.tensor_type != gguf.GGMLQuantizationType[type_name]:
            continue
        ternary += 1
        original = layout.load(planned[tensor.name]).numpy()  # in GGUF layout (q/k rows permuted)
        values = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type).reshape(original.shape)
        np.testing.assert_array_equal(values, original, err_msg=tensor.name)
        if ref is not None:  # ggml's own encoder on the same input writes the same bytes
            expected = ref.quantize(type_name, original.reshape(-1, original.shape[-1]))
            assert np.asarray(tensor.data).tobytes() == expected.tobytes(), tensor.name
    assert ternary == 2 * 7  # every projection; the recipe keeps the output head in float
    report = json.loads(out.with_name("bitnet.quantkit_report.json").read_text())
    assert not any("ternar" in note for note in report["notes"])


def test_rows_256_does_not_divide_are_f16_of_the_ternary_values(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """llama.cpp would fall back to Q4_0, which does not keep {-s, 0, s}; F16 keeps the ternary values."""
    out = tmp_path / "narrow.gguf"
    code, stdout, err = run("quantize", tiny_models["llama"], "--method", "ternary", "--format", "gguf", "--out", out)
    assert code == 0, err
    assert "post-training ternarization destroys the quality" in " ".join(stdout.split())
    weights = [t for t in gguf.GGUFReader(out).tensors if t.name.endswith("attn_output.weight")]
    assert weights and all(t.tensor_type == gguf.GGMLQuantizationType.F16 for t in weights)
    values = np.asarray(weights[0].data).astype(np.float32)
    assert len(np.unique(np.abs(values))) == 2  # 0 and one scale


def test_groups_that_split_a_block_are_refused(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    code, _, err = run("quantize", tiny_models["llama"], "--method", "ternary", "--group-size", "64", "--format",
                       "gguf", "--out", tmp_path / "g.gguf")
    assert code != 0 and "group size 64 splits them" in err and "Traceback" not in err
    assert not (tmp_path / "g.gguf").exists()


def test_other_integer_schemes_beside_ternary_are_refused(tiny_models: dict[str, Path]) -> None:
    recipe = Recipe(make_config("ternary")).with_rule(["role:attention"], method="absmax", bits=8)
    plan = make_plan(Checkpoint.open(tiny_models["llama"]), recipe)
    with pytest.raises(QuantkitError, match=r"holds k-quant, ternary and float weights only; .*absmax int8"):
        OUTPUT_FORMATS.get("gguf").check(plan)
