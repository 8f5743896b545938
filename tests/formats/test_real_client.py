"""A real client: plain transformers (with compressed-tensors) loads quantkit's output.

Its logits must equal quantkit's own loader's (both dequantize the same bytes) and differ
from the float original by a bounded amount. Symmetric (absmax) only: transformers 5.23's
compressed-tensors path cannot load asymmetric pack-quantized weights (docs/formats.md).
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import torch

from quantkit.api import QuantizeOptions, quantize
from quantkit.formats.load import load_quantized
from quantkit.recipe import Recipe, get_preset
from quantkit.schemes import make_config

pytest.importorskip("compressed_tensors", reason="the real-client check needs compressed-tensors")


@pytest.mark.parametrize(("arch", "bits"), [("llama", 4), ("qwen2_moe", 4), ("deepseek_v3", 4), ("mixtral", 8)])
def test_plain_transformers_matches_quantkit_loader(
    arch: str, bits: int, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    import transformers

    out = tmp_path / "out"
    recipe = get_preset("int4-sym-g128").with_default(bits=bits, group_size=16)
    quantize(tiny_models[arch], recipe, out, options=QuantizeOptions(show_progress=False))
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        client = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        ours = load_quantized(out, dtype=torch.float32)
        base = transformers.AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32)
        client_logits, our_logits, base_logits = (m(ids).logits for m in (client, ours, base))
    assert torch.allclose(client_logits, our_logits, rtol=0, atol=1e-5)
    drift = float((our_logits - base_logits).norm() / base_logits.norm())
    assert 0 < drift < (0.5 if bits == 4 else 0.05), drift  # random routers amplify weight error


def test_real_model_loads_in_transformers(stories_model: Path, tmp_path: Path) -> None:
    import transformers

    out = tmp_path / "out"
    quantize(stories_model, get_preset("int8"), out, options=QuantizeOptions(show_progress=False))
    ids = torch.tensor([[1, 403, 407, 261, 378, 426, 263, 395]])
    with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
        client = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        base = transformers.AutoModelForCausalLM.from_pretrained(stories_model, dtype=torch.float32)
        a, b = client(ids).logits, base(ids).logits
    assert torch.equal(a, load_quantized(out, dtype=torch.float32)(ids).logits.detach())
    assert float((a - b).norm() / b.norm()) < 0.02


def test_plain_transformers_reads_a_ternary_model_exactly(bitnet_model: Path, tmp_path: Path) -> None:
    """--method ternary as 2-bit pack-quantized: transformers' compressed-tensors path gets the original weights."""
    import transformers

    out = tmp_path / "out"
    quantize(bitnet_model, Recipe(make_config("ternary")), out, options=QuantizeOptions(show_progress=False))
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        client = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        base = transformers.AutoModelForCausalLM.from_pretrained(bitnet_model, dtype=torch.float32)
        assert torch.equal(client(ids).logits, base(ids).logits)
