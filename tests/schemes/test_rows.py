"""Quantizing a weight by blocks of rows is exact for row-wise schemes, and the error is the whole weight's."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from quantkit.recipe import get_preset
from quantkit.schemes import SCHEMES
from quantkit.schemes.base import IntQuantized
from quantkit.schemes.rows import quantize_rows, relative_error, row_blocks

SETTINGS: dict[str, dict[str, Any]] = {
    "absmax channel": dict(method="absmax", bits=4, group_size=-1),
    "absmax g32 partial": dict(method="absmax", bits=4, group_size=32),  # rows of 70: groups 32, 32, 6
    "zeropoint g32 partial": dict(method="zeropoint", bits=3, group_size=32),
    "absmax mse clip": dict(method="absmax", bits=4, group_size=32, clip="mse"),
    "ternary g32": dict(method="ternary", group_size=32),
    "absmax tensor (not split)": dict(method="absmax", bits=8, granularity="tensor"),
}
ELEMENTS = 700  # 10 rows of 70 per block: 30 blocks for the 300-row weight


def test_row_blocks_cover_every_row_once() -> None:
    blocks = list(row_blocks(301, 70, ELEMENTS))
    assert [b.start for b in blocks] == list(range(0, 301, 10)) and blocks[-1] == slice(300, 301)
    assert list(row_blocks(3, 10_000, ELEMENTS)) == [slice(0, 1), slice(1, 2), slice(2, 3)]  # a row at least


@pytest.mark.parametrize("setting", SETTINGS)
def test_blocks_of_rows_give_the_whole_weights_codes(setting: str) -> None:
    config = get_preset("int8").with_default(**SETTINGS[setting]).default
    scheme = SCHEMES.get(config.method)
    weight = (torch.randn(300, 70, generator=torch.Generator().manual_seed(1)) * 0.05).to(torch.bfloat16)
    whole = scheme.quantize(weight, config)
    blocks = quantize_rows(scheme, weight, config, elements=ELEMENTS)
    assert isinstance(whole, IntQuantized) and isinstance(blocks, IntQuantized)
    assert torch.equal(blocks.codes, whole.codes) and torch.equal(blocks.scale, whole.scale)
    assert (blocks.zero_point is None) == (whole.zero_point is None)
    if whole.zero_point is not None:
        assert blocks.zero_point is not None and torch.equal(blocks.zero_point, whole.zero_point)
    exact = relative_error(weight, whole.dequantize(), elements=weight.numel())
    assert relative_error(weight, blocks, elements=ELEMENTS) == pytest.approx(exact, rel=1e-12)
    assert relative_error(weight, whole, elements=weight.numel()) == exact  # one block: the old formula, bit for bit
