"""A group size that does not divide the row: the last group is shorter (issue 15, item 1).

The reference GPTQ (IST-DASLab/gptq) and compressed-tensors define groups as columns ``[k*g, (k+1)*g)``,
the last one ending at the row's end, with ``ceil(in/g)`` scale columns. The independent rule here cuts
the row into those column ranges itself and quantizes each range on its own, one scale per row
(per-channel quantization of the range's columns, whose math the scheme tests check against their own
references); the grouped result must equal it exactly. GPTQ is checked against the literal port of the
reference in ``test_gptq_solver.py``, which slices ``W[:, i:i + groupsize]`` and so has the same rule.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import pytest
import torch

from quantkit.errors import QuantkitError
from quantkit.recipe import recipe_from_dict
from quantkit.schemes import SCHEMES, IntConfig, IntQuantized, make_config
from quantkit.schemes.gptq_solver import gptq_quantize
from tests.schemes.test_gptq_solver import (
    assert_same,
    correlated_inputs,
    gaussian_weight,
    hessian_of,
    ref_gptq,
)

# (rows, in, group): 96 = 64 + 32 (hidden 96 with g64), 172 = 5 x 32 + 12 (a down_proj of 172 columns),
# 40 < 64 (a row shorter than the group is one group), 576 = 4 x 128 + 64 (SmolLM's hidden size)
SHAPES = [(8, 96, 64), (6, 172, 32), (4, 40, 64), (5, 576, 128)]
CONFIGS = [
    dict(method="absmax"),
    dict(method="absmax", range="full"),
    dict(method="zeropoint"),
    dict(method="absmax", bits=8, activations="dynamic"),  # W8A8: the weight grid is absmax int8
    dict(method="absmax", bits=8, activations="static"),
]


def reference_groups(in_features: int, group_size: int) -> list[slice]:
    """The reference's groups: columns [k*g, (k+1)*g), the last one ending at the row's end."""
    return [slice(start, min(start + group_size, in_features)) for start in range(0, in_features, group_size)]


def group_by_group(weight: torch.Tensor, config: IntConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Codes, scales ``[rows, n_groups]`` and zero points from quantizing each group's columns on their own."""
    assert config.group_size is not None
    per_row = config.with_updates(granularity="channel")
    codes, scales, zeros = [], [], []
    for columns in reference_groups(weight.shape[1], config.group_size):
        part = SCHEMES.get(config.method).quantize(weight[:, columns].contiguous(), per_row)
        assert isinstance(part, IntQuantized)
        codes.append(part.codes)
        scales.append(part.scale)
        zeros.append(part.zero_point)
    zero = None if zeros[0] is None else torch.cat([z for z in zeros if z is not None], dim=1)
    return torch.cat(codes, dim=1), torch.cat(scales, dim=1), zero


@pytest.mark.parametrize(("rows", "columns", "group"), SHAPES)
@pytest.mark.parametrize("settings", CONFIGS, ids=lambda s: "-".join(str(v) for v in s.values()))
@pytest.mark.parametrize("clip", ["minmax", "percentile", "mse"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_partial_last_group_equals_the_reference_rule(
    rows: int, columns: int, group: int, settings: dict[str, Any], clip: str, dtype: torch.dtype
) -> None:
    settings = {"bits": 4, **settings}
    config = make_config(**settings, group_size=group, clip=clip, percentile=90.0)
    assert isinstance(config, IntConfig)
    config.validate()
    config.check_shape("w", (rows, columns))
    weight = gaussian_weight(rows, columns, seed=rows + columns, dtype=dtype)
    weight[0, -1] = 0.5  # an outlier in the partial group only: its scale must not leak into the full groups
    ours = SCHEMES.get(config.method).quantize(weight, config)
    assert isinstance(ours, IntQuantized)
    codes, scale, zero = group_by_group(weight, config)
    n_groups = math.ceil(columns / group)
    assert ours.scale.shape == (rows, n_groups)
    assert torch.equal(ours.codes, codes) and torch.equal(ours.scale, scale)
    assert (ours.zero_point is None) == (zero is None)
    if ours.zero_point is not None and zero is not None:
        assert torch.equal(ours.zero_point, zero)
    expected = torch.cat([(codes[:, c].to(scale.dtype) - (0 if zero is None else zero[:, k : k + 1].to(scale.dtype)))
                          * scale[:, k : k + 1] for k, c in enumerate(reference_groups(columns, group))], dim=1)
    assert torch.equal(ours.dequantize(), expected)
    assert config.partial_group(columns) == (columns % group or None if columns > group else columns)
    assert config.bits_per_weight((rows, columns), ours.scale.element_size() * 8) == pytest.approx(
        ours.bits_per_weight, abs=1e-12)


def test_dividing_group_sizes_are_unchanged() -> None:
    """A dividing group size takes the one-piece path it always took (the byte-identity cases)."""
    weight = gaussian_weight(8, 128, seed=3)
    config = make_config("zeropoint", bits=4, group_size=32)
    assert isinstance(config, IntConfig) and config.partial_group(128) is None
    ours = SCHEMES.get("zeropoint").quantize(weight, config)
    codes, scale, _ = group_by_group(weight, config)
    assert isinstance(ours, IntQuantized) and torch.equal(ours.codes, codes) and torch.equal(ours.scale, scale)


# --- --group-size -1 / 0: per channel, as GPTQ tooling spells it


@pytest.mark.parametrize("method", ["absmax", "zeropoint", "gptq"])
@pytest.mark.parametrize("size", [-1, 0])
def test_group_size_minus_one_or_zero_is_per_channel(method: str, size: int) -> None:
    config = make_config(method, bits=4, group_size=size)
    assert isinstance(config, IntConfig)
    assert (config.granularity, config.group_size) == ("channel", None)
    config.validate()
    grouped = make_config(method, bits=4, group_size=128)
    assert grouped.with_updates(group_size=size) == config
    assert make_config(method, bits=4, granularity="tensor", group_size=size).granularity == "tensor"


def test_group_granularity_without_a_size_hints_at_per_channel() -> None:
    with pytest.raises(QuantkitError, match=r"positive group size, got None \(group size -1 or 0 means one scale"):
        make_config("absmax", granularity="group").validate()


@pytest.mark.parametrize("size", [-1, 0])
def test_recipes_take_group_size_minus_one_or_zero(size: int) -> None:
    recipe = recipe_from_dict({"version": 1, "default": {"method": "zeropoint", "bits": 4, "group_size": 128},
                               "rules": [{"match": "role:attention", "group_size": size}]})
    assert isinstance(recipe.default, IntConfig) and recipe.default.group_size == 128
    rule = recipe.default.with_updates(**recipe.rules[0].changes)
    assert isinstance(rule, IntConfig) and (rule.granularity, rule.group_size) == ("channel", None)
    direct = recipe_from_dict({"version": 1, "default": {"method": "absmax", "bits": 4, "group_size": size}})
    assert isinstance(direct.default, IntConfig) and direct.default.granularity == "channel"


def test_recipes_refuse_other_negative_group_sizes() -> None:
    with pytest.raises(QuantkitError, match="-1 or 0 means one scale per row"):
        recipe_from_dict({"version": 1, "default": {"method": "absmax", "bits": 4, "group_size": -2}})


# --- GPTQ: against the reference port, act-order, static groups, batched experts

GPTQ_CASES: dict[str, dict[str, Any]] = {
    "g128": dict(group_size=128),
    "g128 act-order": dict(group_size=128, act_order=True),
    "g128 act-order static": dict(group_size=128, act_order=True, static_groups=True),
    "g128 static": dict(group_size=128, static_groups=True),
    "g128 symmetric act-order": dict(group_size=128, symmetric=True, act_order=True),
    "g128 mse": dict(group_size=128, mse_clip=True),
    "g1024 (one group)": dict(group_size=1024),
}


@functools.cache
def partial_layer() -> tuple[torch.Tensor, torch.Tensor]:
    """A 96 x 576 layer (576 = 4 x 128 + 64) on 2048 tokens of correlated inputs."""
    x = correlated_inputs(2048, 576, seed=4)
    return gaussian_weight(96, 576, seed=4), hessian_of(x)


@pytest.mark.parametrize("case", GPTQ_CASES)
def test_gptq_partial_group_matches_reference_port(case: str) -> None:
    weight, hessian = partial_layer()
    options = GPTQ_CASES[case]
    ref_q, ref_codes, ref_loss = ref_gptq(
        weight, hessian.clone(), 4, groupsize=int(options["group_size"]), sym=bool(options.get("symmetric")),
        mse=bool(options.get("mse_clip")), actorder=bool(options.get("act_order")),
        static_groups=bool(options.get("static_groups")),
    )
    ours = gptq_quantize(weight, hessian, bits=4, scale_dtype=torch.float32, **options)
    n_groups = math.ceil(576 / options["group_size"])
    assert ours.scale.shape == (96, n_groups)
    # the same bound as test_gptq_solver.test_matches_reference_port
    mismatched = float(((ref_codes - 8).to(torch.int8) != ours.codes).float().mean())
    assert mismatched < 1e-3
    assert float(ours.loss) == pytest.approx(ref_loss, rel=1e-4)
    if mismatched == 0:
        assert torch.equal(ours.dequantized, ref_q)
    assert torch.equal(ours.dequantize().float(), ours.dequantized)
    if ours.g_idx is not None:  # act-order without static groups: the last group in processing order is short
        counts = torch.bincount(ours.g_idx.to(torch.long), minlength=n_groups)
        assert counts.tolist() == [128] * 4 + [64]


def test_gptq_partial_group_with_blocks_shortened_for_groups() -> None:
    """g48 in blocks of 128 on 200 columns (4 x 48 + 8): blocks end on group starts; output equals Q."""
    weight, hessian = gaussian_weight(16, 200, seed=5), hessian_of(correlated_inputs(512, 200, seed=5))
    result = gptq_quantize(weight, hessian, bits=4, group_size=48)
    assert result.scale.shape == (16, 5)
    assert torch.equal(result.dequantize().float(), result.dequantized)
    assert torch.equal(result.quantized.dequantize().float(), result.dequantized)


PARTIAL_EXPERT_OPTIONS = [
    dict(group_size=32, act_order=True),
    dict(group_size=32, act_order=True, static_groups=True),
    dict(group_size=32, symmetric=True),
    dict(group_size=32, mse_clip=True),
]


@pytest.mark.parametrize("options", PARTIAL_EXPERT_OPTIONS)
def test_gptq_batched_experts_with_a_partial_group_equal_one_by_one(options: dict[str, Any]) -> None:
    """4 experts of width 48 (a 32 + 16 split), bf16, each with its own Hessian."""
    weight = torch.stack([gaussian_weight(24, 48, seed=30 + e, dtype=torch.bfloat16) for e in range(4)])
    hessian = torch.stack([hessian_of(correlated_inputs(128, 48, seed=40 + e)) for e in range(4)])
    batched = gptq_quantize(weight, hessian, bits=4, **options)
    assert batched.scale.shape == (4, 24, 2)
    for expert, result in enumerate(batched.experts()):
        assert_same(result, gptq_quantize(weight[expert], hessian[expert], bits=4, **options))
    assert torch.equal(batched.dequantize().float(), batched.dequantized)
