"""k-quant presets: type tables checked against llama.cpp's llama_tensor_get_type (llama-quant.cpp).

Every expected table here is written out by hand from reading the C++ of llama-cpp-python 0.3.36's
vendored llama.cpp, not derived from the implementation.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import pytest

from quantkit.errors import QuantkitError
from quantkit.kquants.preset_sizes import llama3_8b_tensors, mix_bits_per_weight, preset_summaries
from quantkit.kquants.presets import (
    KQUANT_PRESETS,
    Assignment,
    TensorSpec,
    assign_types,
    block_size,
    fallback_type,
    preset_rules,
    type_bits_per_weight,
    use_more_bits,
)

# use_more_bits(i, 32): i < 4, i >= 28, or (i - 4) % 3 == 2  ->  0-3, 6, 9, ..., 27, 28-31
MORE_BITS_32 = "HHHH" "LLHLLHLLHLLHLLHLLHLLHLLH" "HHHH"
# use_more_bits(i, 8): i < 1, i >= 7, or (i - 1) % 3 == 2  ->  0, 3, 6, 7
MORE_BITS_8 = "HLLHLLHH"


def llama(n_layers: int, hidden: int = 512, kv: int = 128, ffn: int = 1024, tied: bool = False) -> list[TensorSpec]:
    specs = [TensorSpec("token_embd.weight", (1000, hidden)), TensorSpec("output_norm.weight", (hidden,))]
    if not tied:
        specs.append(TensorSpec("output.weight", (1000, hidden)))
    for i in range(n_layers):
        specs += [
            TensorSpec(f"blk.{i}.attn_norm.weight", (hidden,)),
            TensorSpec(f"blk.{i}.attn_q.weight", (hidden, hidden)),
            TensorSpec(f"blk.{i}.attn_k.weight", (kv, hidden)),
            TensorSpec(f"blk.{i}.attn_v.weight", (kv, hidden)),
            TensorSpec(f"blk.{i}.attn_output.weight", (hidden, hidden)),
            TensorSpec(f"blk.{i}.ffn_norm.weight", (hidden,)),
            TensorSpec(f"blk.{i}.ffn_gate.weight", (ffn, hidden)),
            TensorSpec(f"blk.{i}.ffn_up.weight", (ffn, hidden)),
            TensorSpec(f"blk.{i}.ffn_down.weight", (hidden, ffn)),
        ]
    return specs


def mixtral(n_layers: int, n_experts: int, hidden: int = 512, ffn: int = 1024) -> list[TensorSpec]:
    specs = [
        TensorSpec("token_embd.weight", (1000, hidden)),
        TensorSpec("output.weight", (1000, hidden)),
        TensorSpec("output_norm.weight", (hidden,)),
    ]
    for i in range(n_layers):
        specs += [
            TensorSpec(f"blk.{i}.attn_norm.weight", (hidden,)),
            TensorSpec(f"blk.{i}.attn_q.weight", (hidden, hidden)),
            TensorSpec(f"blk.{i}.attn_k.weight", (128, hidden)),
            TensorSpec(f"blk.{i}.attn_v.weight", (128, hidden)),
            TensorSpec(f"blk.{i}.attn_output.weight", (hidden, hidden)),
            TensorSpec(f"blk.{i}.ffn_norm.weight", (hidden,)),
            TensorSpec(f"blk.{i}.ffn_gate_inp.weight", (n_experts, hidden)),
            TensorSpec(f"blk.{i}.ffn_gate_exps.weight", (n_experts, ffn, hidden)),
            TensorSpec(f"blk.{i}.ffn_up_exps.weight", (n_experts, ffn, hidden)),
            TensorSpec(f"blk.{i}.ffn_down_exps.weight", (n_experts, hidden, ffn)),
        ]
    return specs


def deepseek_v2_lite(n_layers: int = 8) -> list[TensorSpec]:
    """DeepSeek-V2-Lite's shapes (hidden 2048, dense FFN 10944, experts 1408, 2 shared, 64 routed)."""
    specs = [
        TensorSpec("token_embd.weight", (102400, 2048)),
        TensorSpec("output.weight", (102400, 2048)),
        TensorSpec("output_norm.weight", (2048,)),
    ]
    for i in range(n_layers):
        specs += [
            TensorSpec(f"blk.{i}.attn_norm.weight", (2048,)),
            TensorSpec(f"blk.{i}.attn_q.weight", (16 * 192, 2048)),
            TensorSpec(f"blk.{i}.attn_kv_a_mqa.weight", (576, 2048)),
            TensorSpec(f"blk.{i}.attn_kv_a_norm.weight", (512,)),
            TensorSpec(f"blk.{i}.attn_kv_b.weight", (16 * 256, 512)),
            TensorSpec(f"blk.{i}.attn_output.weight", (2048, 16 * 128)),
            TensorSpec(f"blk.{i}.ffn_norm.weight", (2048,)),
        ]
        if i == 0:
            specs += [
                TensorSpec("blk.0.ffn_gate.weight", (10944, 2048)),
                TensorSpec("blk.0.ffn_up.weight", (10944, 2048)),
                TensorSpec("blk.0.ffn_down.weight", (2048, 10944)),
            ]
        else:
            specs += [
                TensorSpec(f"blk.{i}.ffn_gate_inp.weight", (64, 2048)),
                TensorSpec(f"blk.{i}.exp_probs_b.bias", (64,)),
                TensorSpec(f"blk.{i}.ffn_gate_exps.weight", (64, 1408, 2048)),
                TensorSpec(f"blk.{i}.ffn_up_exps.weight", (64, 1408, 2048)),
                TensorSpec(f"blk.{i}.ffn_down_exps.weight", (64, 2048, 1408)),
                TensorSpec(f"blk.{i}.ffn_gate_shexp.weight", (2816, 2048)),
                TensorSpec(f"blk.{i}.ffn_up_shexp.weight", (2816, 2048)),
                TensorSpec(f"blk.{i}.ffn_down_shexp.weight", (2048, 2816)),
            ]
    return specs


def types(assigned: dict[str, Assignment]) -> dict[str, str]:
    return {name: a.type for name, a in assigned.items()}


def expect_llama(
    n_layers: int,
    *,
    output: str,
    token_embd: str,
    attn_v: Sequence[str],
    ffn_down: Sequence[str],
    attn_output: str,
    rest: str,
    tied: bool = False,
) -> dict[str, str]:
    """A dense llama table: ``attn_v``/``ffn_down`` give one type per layer, the others one type for all."""
    assert len(attn_v) == len(ffn_down) == n_layers
    table = {"token_embd.weight": token_embd, "output_norm.weight": "F32"}
    if not tied:
        table["output.weight"] = output
    for i in range(n_layers):
        for name, kind in (
            ("attn_norm", "F32"), ("attn_q", rest), ("attn_k", rest), ("attn_v", attn_v[i]),
            ("attn_output", attn_output), ("ffn_norm", "F32"), ("ffn_gate", rest), ("ffn_up", rest),
            ("ffn_down", ffn_down[i]),
        ):
            table[f"blk.{i}.{name}.weight"] = kind
    return table


def letters(pattern: str, high: str, low: str) -> list[str]:
    return [high if c == "H" else low for c in pattern]


def test_use_more_bits_32_layers() -> None:
    assert len(MORE_BITS_32) == 32
    assert "".join("H" if use_more_bits(i, 32) else "L" for i in range(32)) == MORE_BITS_32


def test_q4_k_m_llama_32_layers() -> None:
    got = assign_types("Q4_K_M", llama(32), n_layers=32, n_experts=0, n_head=32, n_head_kv=8)
    more = letters(MORE_BITS_32, "Q6_K", "Q4_K")
    assert types(got) == expect_llama(
        32, output="Q6_K", token_embd="Q4_K", attn_v=more, ffn_down=more,
        attn_output="Q4_K", rest="Q4_K",
    )
    assert got["blk.6.attn_v.weight"].rule == "attn_v on a more-bits layer"
    assert got["blk.7.ffn_down.weight"].rule == "ffn_down off the more-bits layers"
    assert got["blk.0.attn_norm.weight"].rule == "1-D: never quantized"


def test_q5_k_m_llama_32_layers() -> None:
    more = letters(MORE_BITS_32, "Q6_K", "Q5_K")
    got = assign_types("Q5_K_M", llama(32), n_layers=32, n_experts=0, n_head=32, n_head_kv=8)
    assert types(got) == expect_llama(
        32, output="Q6_K", token_embd="Q5_K", attn_v=more, ffn_down=more,
        attn_output="Q5_K", rest="Q5_K",
    )


@pytest.mark.parametrize("n_layers", [32, 48])
def test_q3_k_m(n_layers: int) -> None:
    # attn_v: Q5_K for the first 2 (i_attention_wv < 2); ffn_down: Q5_K on layers < n/16 (2 of 32, 3 of 48)
    ffn_q5 = {32: 2, 48: 3}[n_layers]
    attn_v = ["Q5_K"] * 2 + ["Q4_K"] * (n_layers - 2)
    ffn_down = ["Q5_K"] * ffn_q5 + ["Q4_K"] * (n_layers - ffn_q5)
    got = assign_types("Q3_K_M", llama(n_layers), n_layers=n_layers, n_experts=0, n_head=32, n_head_kv=8)
    assert types(got) == expect_llama(
        n_layers, output="Q6_K", token_embd="Q3_K", attn_v=attn_v, ffn_down=ffn_down,
        attn_output="Q4_K", rest="Q3_K",
    )


def test_q4_k_s_40_layers() -> None:
    # attn_v: the first 4 attn_v tensors (i_attention_wv < 4); ffn_down: layers < 40/8 = 5
    got = assign_types("Q4_K_S", llama(40), n_layers=40, n_experts=0, n_head=32, n_head_kv=8)
    assert types(got) == expect_llama(
        40, output="Q6_K", token_embd="Q4_K", attn_v=["Q5_K"] * 4 + ["Q4_K"] * 36,
        ffn_down=["Q5_K"] * 5 + ["Q4_K"] * 35, attn_output="Q4_K", rest="Q4_K",
    )


@pytest.mark.parametrize(("n_head_kv", "attn_v"), [(8, "Q4_K"), (16, "Q3_K"), (32, "Q3_K")])
def test_q2_k_attn_v_follows_gqa(n_head_kv: int, attn_v: str) -> None:
    # Q2_K: attn_v Q4_K when n_gqa >= 4 else Q3_K; ffn_down Q3_K; attn_output Q3_K; token_embd stays Q2_K
    got = assign_types("Q2_K", llama(32), n_layers=32, n_experts=0, n_head=32, n_head_kv=n_head_kv)
    assert types(got) == expect_llama(
        32, output="Q6_K", token_embd="Q2_K", attn_v=[attn_v] * 32, ffn_down=["Q3_K"] * 32,
        attn_output="Q3_K", rest="Q2_K",
    )


@pytest.mark.parametrize(
    ("preset", "base", "upgraded", "output"),
    [
        ("Q3_K_S", "Q3_K", "Q3_K", "Q6_K"),
        ("Q3_K_L", "Q3_K", "Q5_K", "Q6_K"),
        ("Q5_K_S", "Q5_K", "Q5_K", "Q6_K"),
        ("Q6_K", "Q6_K", "Q6_K", "Q6_K"),
        ("Q8_0", "Q8_0", "Q8_0", "Q8_0"),
    ],
)
def test_flat_presets(preset: str, base: str, upgraded: str, output: str) -> None:
    # Q3_K_L: attn_v, ffn_down and attn_output Q5_K everywhere; the others only change output.weight
    got = assign_types(preset, llama(32), n_layers=32, n_experts=0, n_head=32, n_head_kv=8)
    assert types(got) == expect_llama(
        32, output=output, token_embd=base, attn_v=[upgraded] * 32, ffn_down=[upgraded] * 32,
        attn_output=upgraded, rest=base,
    )


def test_input_order_does_not_matter() -> None:
    # llama.cpp counts attn_v and (dense) ffn_down in its own file order: by block number, then name
    specs = llama(32)
    shuffled = specs[:]
    random.Random(0).shuffle(shuffled)
    got = assign_types("Q4_K_M", shuffled, n_layers=32, n_experts=0, n_head=32, n_head_kv=8)
    assert types(got) == types(assign_types("Q4_K_M", specs, n_layers=32, n_experts=0, n_head=32, n_head_kv=8))
    assert list(got) == [s.name for s in shuffled]


def test_tied_embeddings_take_the_output_rules() -> None:
    got = assign_types("Q4_K_M", llama(8, tied=True), n_layers=8, n_experts=0, n_head=8, n_head_kv=8)
    assert got["token_embd.weight"].type == "Q6_K"
    assert "tied" in got["token_embd.weight"].rule
    got = assign_types("Q8_0", llama(8, tied=True), n_layers=8, n_experts=0, n_head=8, n_head_kv=8)
    assert got["token_embd.weight"].type == "Q8_0"


def test_mixtral_8_experts_q4_k_m() -> None:
    # n_expert == 8: attn_v and attn_k Q8_0, attn_output Q5_K; ffn_down_exps by block number on use_more_bits
    got = types(assign_types("Q4_K_M", mixtral(32, 8), n_layers=32, n_experts=8, n_head=32, n_head_kv=8))
    assert got["output.weight"] == "Q6_K"
    assert got["token_embd.weight"] == "Q4_K"
    for i in range(32):
        assert got[f"blk.{i}.attn_q.weight"] == "Q4_K"
        assert got[f"blk.{i}.attn_k.weight"] == "Q8_0"
        assert got[f"blk.{i}.attn_v.weight"] == "Q8_0"
        assert got[f"blk.{i}.attn_output.weight"] == "Q5_K"
        assert got[f"blk.{i}.ffn_gate_inp.weight"] == "F32"
        assert got[f"blk.{i}.ffn_gate_exps.weight"] == "Q4_K"
        assert got[f"blk.{i}.ffn_up_exps.weight"] == "Q4_K"
        assert got[f"blk.{i}.ffn_down_exps.weight"] == {"H": "Q6_K", "L": "Q4_K"}[MORE_BITS_32[i]]


@pytest.mark.parametrize(
    ("preset", "attn_output", "ffn_down", "rest"),
    [
        ("Q2_K", "Q5_K", "Q3_K", "Q2_K"),
        ("Q3_K_S", "Q5_K", "Q3_K", "Q3_K"),
        ("Q3_K_L", "Q3_K", "Q5_K", "Q3_K"),  # Q3_K_L is missing from llama.cpp's 8-expert attn_output list
        ("Q4_K_S", "Q5_K", "Q4_K", "Q4_K"),
        ("Q5_K_S", "Q5_K", "Q5_K", "Q5_K"),
        ("Q6_K", "Q6_K", "Q6_K", "Q6_K"),
    ],
)
def test_mixtral_8_experts_flat_layers(preset: str, attn_output: str, ffn_down: str, rest: str) -> None:
    # layers past n/8 (and so past Q4_K_S's ffn_down bump) of a 32-layer 8-expert model
    got = types(assign_types(preset, mixtral(32, 8), n_layers=32, n_experts=8, n_head=32, n_head_kv=8))
    for i in (4, 10, 20):
        assert got[f"blk.{i}.attn_v.weight"] == "Q8_0"
        assert got[f"blk.{i}.attn_k.weight"] == "Q8_0"
        assert got[f"blk.{i}.attn_output.weight"] == attn_output
        assert got[f"blk.{i}.ffn_down_exps.weight"] == ffn_down
        assert got[f"blk.{i}.attn_q.weight"] == rest
        assert got[f"blk.{i}.ffn_up_exps.weight"] == rest


def test_sixty_four_experts_are_not_the_8_expert_case() -> None:
    # the C++ tests n_expert == 8 exactly: 64 experts follow the dense rules
    got = types(assign_types("Q4_K_M", mixtral(32, 64), n_layers=32, n_experts=64, n_head=32, n_head_kv=8))
    for i in range(32):
        more = {"H": "Q6_K", "L": "Q4_K"}[MORE_BITS_32[i]]
        assert got[f"blk.{i}.attn_v.weight"] == more
        assert got[f"blk.{i}.ffn_down_exps.weight"] == more
        assert got[f"blk.{i}.attn_k.weight"] == "Q4_K"
        assert got[f"blk.{i}.attn_output.weight"] == "Q4_K"


def expect_deepseek(more_bits: str) -> dict[str, str]:
    """Q4_K_M on deepseek_v2_lite(8): attn_kv_b counts as attn_v; 1408/10944-wide rows fall back."""
    hi = {"H": True, "L": False}
    table = {"token_embd.weight": "Q4_K", "output.weight": "Q6_K", "output_norm.weight": "F32"}
    for i in range(8):
        up = hi[more_bits[i]]
        table |= {
            f"blk.{i}.attn_norm.weight": "F32",
            f"blk.{i}.attn_q.weight": "Q4_K",
            f"blk.{i}.attn_kv_a_mqa.weight": "Q4_K",
            f"blk.{i}.attn_kv_a_norm.weight": "F32",
            f"blk.{i}.attn_kv_b.weight": "Q6_K" if up else "Q4_K",
            f"blk.{i}.attn_output.weight": "Q4_K",
            f"blk.{i}.ffn_norm.weight": "F32",
        }
        if i == 0:
            # rows of 10944 = 42.75 * 256: Q4_K -> Q5_0, Q6_K -> Q8_0
            table |= {"blk.0.ffn_gate.weight": "Q4_K", "blk.0.ffn_up.weight": "Q4_K", "blk.0.ffn_down.weight": "Q8_0"}
        else:
            table |= {
                f"blk.{i}.ffn_gate_inp.weight": "F32",
                f"blk.{i}.exp_probs_b.bias": "F32",
                f"blk.{i}.ffn_gate_exps.weight": "Q4_K",
                f"blk.{i}.ffn_up_exps.weight": "Q4_K",
                f"blk.{i}.ffn_down_exps.weight": "Q8_0" if up else "Q5_0",  # rows of 1408 = 5.5 * 256
                f"blk.{i}.ffn_gate_shexp.weight": "Q4_K",
                f"blk.{i}.ffn_up_shexp.weight": "Q4_K",
                f"blk.{i}.ffn_down_shexp.weight": "Q6_K" if up else "Q4_K",  # rows of 2816 = 11 * 256
            }
    return table


def test_deepseek_q4_k_m() -> None:
    got = assign_types("Q4_K_M", deepseek_v2_lite(), n_layers=8, n_experts=64, n_head=16, n_head_kv=16)
    assert types(got) == expect_deepseek(MORE_BITS_8)
    assert got["blk.1.ffn_down_exps.weight"].fallback_from == "Q4_K"
    assert got["blk.3.ffn_down_exps.weight"].fallback_from == "Q6_K"
    assert got["blk.3.ffn_down_exps.weight"].rule.startswith("fallback from Q6_K: row 1408 not divisible by 256")
    assert got["blk.0.ffn_down.weight"].fallback_from == "Q6_K"
    assert got["blk.1.ffn_down_shexp.weight"].fallback_from is None
    assert got["blk.1.ffn_gate_inp.weight"].rule == "router: never quantized"
    assert got["blk.1.exp_probs_b.bias"].rule == "1-D: never quantized"


def test_fallback_for_128_wide_rows() -> None:
    specs = llama(32, hidden=128, kv=128, ffn=384)
    got = assign_types("Q4_K_M", specs, n_layers=32, n_experts=0, n_head=32, n_head_kv=8)
    # output: its row is not a multiple of 256, so the output rule itself picks Q8_0 (no fallback)
    assert (got["output.weight"].type, got["output.weight"].fallback_from) == ("Q8_0", None)
    assert (got["token_embd.weight"].type, got["token_embd.weight"].fallback_from) == ("Q5_0", "Q4_K")
    assert (got["blk.5.attn_q.weight"].type, got["blk.5.attn_q.weight"].fallback_from) == ("Q5_0", "Q4_K")
    assert (got["blk.0.attn_v.weight"].type, got["blk.0.attn_v.weight"].fallback_from) == ("Q8_0", "Q6_K")
    assert got["blk.5.attn_q.weight"].rule == "fallback from Q4_K: row 128 not divisible by 256 (base type)"
    for preset, base, fallback in (("Q2_K", "Q2_K", "Q4_0"), ("Q3_K_S", "Q3_K", "Q4_0"), ("Q5_K_S", "Q5_K", "Q5_1"),
                                   ("Q6_K", "Q6_K", "Q8_0"), ("Q8_0", "Q8_0", "Q8_0")):
        a = assign_types(preset, specs, n_layers=32, n_experts=0, n_head=32, n_head_kv=8)["blk.5.attn_q.weight"]
        assert a.type == fallback
        assert a.fallback_from == (None if base == "Q8_0" else base)


def test_fallback_type() -> None:
    assert fallback_type("Q4_K", 4096) is None
    assert fallback_type("F16", 100) is None
    for target, fallback in (("Q2_K", "Q4_0"), ("Q3_K", "Q4_0"), ("Q4_K", "Q5_0"), ("Q6_K", "Q8_0"),
                             ("TQ1_0", "Q4_0"), ("TQ2_0", "Q4_0")):
        expected = Assignment(fallback, f"fallback from {target}: row 1408 not divisible by 256", target)
        assert fallback_type(target, 1408) == expected
    assert fallback_type("Q5_K", 1408, "--type") == Assignment(
        "Q5_1", "fallback from Q5_K: row 1408 not divisible by 256 (--type)", "Q5_K"
    )
    for legacy in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):  # 32-blocks: C's default branch keeps them, then F16
        assert fallback_type(legacy, 160) is None
        assert fallback_type(legacy, 100) == Assignment("F16", f"fallback from {legacy}: row 100 not divisible by 32",
                                                        legacy)
    assert fallback_type("Q6_K", 100) == Assignment("F16", "fallback from Q6_K: row 100 not divisible by 256", "Q6_K")
    assert fallback_type("Q8_0", 100) == Assignment("F16", "fallback from Q8_0: row 100 not divisible by 32", "Q8_0")
    assert fallback_type("TQ2_0", 172) == Assignment("F16", "fallback from TQ2_0: row 172 not divisible by 256",
                                                     "TQ2_0")


def test_ternary_types_bits_per_weight() -> None:
    """TQ1_0: 54 bytes per 256 weights (five trits a byte); TQ2_0: 66 (two bits a trit); plus the fp16 scale."""
    assert (type_bits_per_weight("TQ1_0"), type_bits_per_weight("TQ2_0")) == (1.6875, 2.0625)
    assert (block_size("TQ1_0"), block_size("TQ2_0")) == (256, 256)


def test_rows_not_a_multiple_of_32_stay_f16() -> None:
    specs = [
        TensorSpec("output.weight", (1000, 100)),
        TensorSpec("token_embd.weight", (1000, 100)),
        TensorSpec("blk.0.attn_q.weight", (100, 100)),
        TensorSpec("blk.0.attn_v.weight", (100, 100)),
    ]
    for preset in ("Q2_K", "Q4_K_M", "Q6_K", "Q8_0"):
        got = assign_types(preset, specs, n_layers=1, n_experts=0, n_head=4, n_head_kv=4)
        assert {a.type for a in got.values()} == {"F16"}, preset


def test_unquantized_tensors() -> None:
    specs = [
        TensorSpec("output.weight", (1000, 256)),
        TensorSpec("position_embd.weight", (2048, 256)),
        TensorSpec("blk.0.ffn_gate_inp.weight", (64, 256)),
        TensorSpec("blk.0.ffn_gate_inp_shexp.weight", (1, 256)),  # 1-D for ggml: trailing ne of 1 do not count
        TensorSpec("blk.0.attn_q_norm.weight", (1, 256)),
        TensorSpec("blk.0.attn_q.bias", (256,)),
        TensorSpec("blk.0.ssm_conv1d.weight", (256, 4)),
    ]
    got = assign_types("Q4_K_M", specs, n_layers=1, n_experts=64, n_head=4, n_head_kv=4)
    assert types(got) == {
        "output.weight": "Q6_K",
        "position_embd.weight": "F32",
        "blk.0.ffn_gate_inp.weight": "F32",
        "blk.0.ffn_gate_inp_shexp.weight": "F32",
        "blk.0.attn_q_norm.weight": "F32",
        "blk.0.attn_q.bias": "F32",
        "blk.0.ssm_conv1d.weight": "F32",
    }


def test_llama3_8b_sizes_match_llama_quantize() -> None:
    # llama-quantize's QUANT_OPTIONS quote these file sizes (GiB, "G", rounded) for Llama-3-8B
    published = {"Q2_K": 2.96, "Q3_K_S": 3.41, "Q3_K_M": 3.74, "Q3_K_L": 4.03, "Q4_K_S": 4.37, "Q4_K_M": 4.58,
                 "Q5_K_S": 5.21, "Q5_K_M": 5.33, "Q6_K": 6.14, "Q8_0": 7.96}
    specs = llama3_8b_tensors()
    n_weights = sum(math.prod(s.shape) for s in specs)
    assert n_weights == 8_030_261_248
    for preset, gib in published.items():
        got = assign_types(preset, specs, n_layers=32, n_experts=0, n_head=32, n_head_kv=8)
        size = mix_bits_per_weight(got, specs) * n_weights / 8 / 2**30
        assert abs(size - gib) < 0.015, (preset, size)


def test_unknown_names_are_one_line_errors() -> None:
    with pytest.raises(QuantkitError, match=r"unknown k-quant preset 'Q4_K_X'; supported: .*Q4_K_M") as err:
        assign_types("Q4_K_X", [], n_layers=1, n_experts=0, n_head=1, n_head_kv=1)
    assert "\n" not in str(err.value)
    with pytest.raises(QuantkitError, match="unknown k-quant preset"):
        preset_rules("Q4_K")


def test_bad_inputs() -> None:
    moe = [TensorSpec("blk.4.ffn_down_exps.weight", (8, 256, 512))]
    with pytest.raises(QuantkitError, match=r"blk\.4\.ffn_down_exps\.weight: no block number in \[0, 4\)"):
        assign_types("Q4_K_M", moe, n_layers=4, n_experts=8, n_head=1, n_head_kv=1)
    twice = [TensorSpec("blk.0.attn_q.weight", (256, 256))] * 2
    with pytest.raises(QuantkitError, match="unique"):
        assign_types("Q4_K_M", twice, n_layers=1, n_experts=0, n_head=1, n_head_kv=1)


def test_preset_rules_and_table() -> None:
    assert list(KQUANT_PRESETS) == sorted(
        ["Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0"]
    )
    rows = dict(preset_rules("Q4_K_M"))
    assert rows["output.weight"] == "Q6_K; Q8_0 if its row is not a multiple of 256"
    assert rows["attn_v, attn_qkv, attn_kv_b"].startswith("Q6_K on use_more_bits layers")
    assert rows["attn_v, attn_qkv, attn_kv_b"].endswith("else Q4_K; Q8_0 with exactly 8 experts")
    assert rows["attn_output"] == "Q4_K; Q5_K with exactly 8 experts"
    assert dict(preset_rules("Q3_K_L"))["attn_output"] == "Q5_K; Q3_K with exactly 8 experts"
    assert dict(preset_rules("Q2_K"))["attn_v, attn_qkv, attn_kv_b"].startswith("Q4_K if n_head/n_head_kv >= 4")
    assert dict(preset_rules("Q8_0"))["attn_k"] == "Q8_0"
    summaries = preset_summaries()
    assert [s["preset"] for s in summaries] == [
        "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0"
    ]
    assert summaries[5]["bpw @ Llama-3-8B"] == "4.89"  # Q4_K_M on Llama-3-8B


# llama.cpp's tensor_type_fallback (src/llama-quant.cpp of llama-cpp-python 0.3.36, lines 390-440), restated:
#   case Q2_K, Q3_K, TQ1_0, TQ2_0: Q4_0 (lines 411-415); case Q4_K: Q5_0 (416); case Q5_K: Q5_1 (417);
#   case Q6_K: Q8_0 (418);
#   default with a block <= 32: the type itself (419-424); then F16 if that block does not divide ncols (429-437).
LLAMA_CPP_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "TQ1_0": "Q4_0", "TQ2_0": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1",
                      "Q6_K": "Q8_0"}


def _llama_cpp_fallback(type_name: str, ncols: int) -> str:
    if type_name in ("F16", "F32") or ncols % block_size(type_name) == 0:
        return type_name
    new = LLAMA_CPP_FALLBACK.get(type_name, type_name)
    return new if ncols % block_size(new) == 0 else "F16"


@pytest.mark.parametrize("narrow", [(96, 288), (160, 480), (100, 300)])
@pytest.mark.parametrize("preset", sorted(KQUANT_PRESETS))
def test_narrow_rows_take_llama_cpp_fallbacks(preset: str, narrow: tuple[int, int]) -> None:
    """On a model whose rows 256 does not divide, each tensor gets llama.cpp's fallback of its wide-model type.

    The rules before the fallback do not look at widths except output.weight's (llama-quant.cpp line 500:
    ``nx % qk_k != 0`` -> Q8_0, then the fallback's F16 when 32 does not divide it either), so the same
    model 512 wide tells the type each rule chose.
    """
    hidden, ffn = narrow
    for n_layers, tied in ((8, False), (12, True)):
        wide = assign_types(preset, llama(n_layers, tied=tied), n_layers=n_layers, n_experts=0, n_head=8,
                            n_head_kv=2)
        got = assign_types(preset, llama(n_layers, hidden=hidden, kv=hidden // 4, ffn=ffn, tied=tied),
                           n_layers=n_layers, n_experts=0, n_head=8, n_head_kv=2)
        output = "output.weight" if not tied else "token_embd.weight"
        for name, a in got.items():
            ncols = ffn if name.endswith("ffn_down.weight") else hidden
            if name == output:
                expected = _llama_cpp_fallback("Q8_0", ncols)
            else:
                expected = _llama_cpp_fallback(wide[name].type, ncols)
            assert a.type == expected, (name, wide[name].type, a.rule)
            if a.type != wide[name].type and name != output:
                assert a.fallback_from == wide[name].type and a.rule.startswith("fallback from")
