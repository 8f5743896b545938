"""A real client for ``--format gptq-v1``: GPTQModel loads quantkit's output with its torch CPU kernel.

GPTQModel pins its own torch and numpy, so it usually lives in its own environment (docs/formats.md);
the test skips where it is not importable. Its logits must equal quantkit's loader's within float
rounding: both dequantize the same fp16 codes, scales and zero points (GPTQModel converts v1's
``zero - 1`` to v2 on load), then run the same float model.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import torch

from quantkit.api import CalibrationSettings, QuantizeOptions, quantize
from quantkit.formats.load import load_quantized
from quantkit.recipe import get_preset
from tests.conftest import build_model, copy_tokenizer, save_model

gptqmodel = pytest.importorskip("gptqmodel", reason="GPTQModel (pip gptqmodel) is the GPTQ v1 client")


def gptq_v1_output(tmp_path: Path, tiny_lm: Path, test_text: Path, **settings: bool) -> Path:
    """A fp16 tiny llama quantized by GPTQ (4 bits, groups of 32) into ``--format gptq-v1``."""
    model = build_model("llama", seed=3).half()
    source = copy_tokenizer(tiny_lm, save_model(model, tmp_path / "fp16"))
    out = tmp_path / "gptq-v1"
    recipe = get_preset("int8").with_default(method="gptq", bits=4, group_size=32, **settings)
    data = CalibrationSettings(dataset=str(test_text), num_samples=4, seq_len=32)
    quantize(source, recipe, out, options=QuantizeOptions(data=data, output_format="gptq-v1", show_progress=False))
    return out


def load_client(out: Path) -> object:
    return gptqmodel.GPTQModel.load(str(out), device="cpu", backend=gptqmodel.BACKEND.GPTQ_TORCH, dtype=torch.float16)


@pytest.mark.slow
@pytest.mark.parametrize("act_order", [False, True])
def test_gptqmodel_logits_equal_quantkit_loader(act_order: bool, tiny_lm: Path, test_text: Path,
                                                tmp_path: Path) -> None:
    out = gptq_v1_output(tmp_path, tiny_lm, test_text, symmetric=True, act_order=act_order)
    ids = torch.randint(0, 120, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        client = load_client(out)
        client_logits = client.model(ids).logits.float()
        our_logits = load_quantized(out, dtype=torch.float16)(ids).logits.float()
    scale = float(our_logits.abs().max())
    assert float((client_logits - our_logits).abs().max()) <= 1e-3 * scale  # fp16 rounding (measured: equal)


@pytest.mark.slow
def test_gptqmodel_refuses_asymmetric_v1_from_other_quantizers(tiny_lm: Path, test_text: Path, tmp_path: Path) -> None:
    """A recorded limit (docs/formats.md): GPTQModel loads asymmetric v1 only from its own quantizer (>= 0.9.0,
    read from ``meta.quantizer``), as older AutoGPTQ files may hold overflowed zero points."""
    out = gptq_v1_output(tmp_path, tiny_lm, test_text, symmetric=False)
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()), \
            pytest.raises(ValueError, match="sym=False"):
        load_client(out)
