"""llama-quantize's overrides of a preset and the 70B attn_v rule, against llama_tensor_get_type read by hand.

The expectations come from reading src/llama-quant.cpp (llama-cpp-python 0.3.36's llama.cpp):
``llama_tensor_get_type`` returns ``--token-embedding-type`` / ``--output-tensor-type`` before anything
else and without the row fallback; a ``--tensor-type`` pattern (first match, ``regex_search``) replaces
``llama_tensor_get_type_impl`` for its tensor, so the attn_v/ffn_down counters skip it, and the fallback
still applies. tests/formats/test_gguf_presets_llama_cpp.py checks the same against llama.cpp itself.
"""

from __future__ import annotations

import pytest

from quantkit.errors import QuantkitError
from quantkit.kquants.preset_overrides import TypeOverrides, join_tensor_types, parse_tensor_types
from quantkit.kquants.presets import TensorSpec, assign_types, is_llama_70b, use_more_bits
from tests.kquants.test_presets import deepseek_v2_lite, llama, types


def overrides(*tensor_types: str, output: str | None = None, embd: str | None = None) -> TypeOverrides:
    return TypeOverrides.parse(" ".join(tensor_types) or None, output, embd)


def llama_types(preset: str, ov: TypeOverrides, n_layers: int = 4, **kw: object) -> dict[str, str]:
    return types(assign_types(preset, llama(n_layers, **kw), n_layers=n_layers, n_experts=0, n_head=8, n_head_kv=8,
                              overrides=ov))


def test_a_pattern_skips_the_attn_v_counter() -> None:
    # Q3_K_M: attn_v is Q5_K while i_attention_wv < 2. blk.0's attn_v is set by hand, so the impl never
    # counts it: blk.1 and blk.2 are the first two it sees
    plain = llama_types("Q3_K_M", TypeOverrides())
    assert [plain[f"blk.{i}.attn_v.weight"] for i in range(4)] == ["Q5_K", "Q5_K", "Q4_K", "Q4_K"]
    got = llama_types("Q3_K_M", overrides(r"blk\.0\.attn_v=q6_k"))
    assert [got[f"blk.{i}.attn_v.weight"] for i in range(4)] == ["Q6_K", "Q5_K", "Q5_K", "Q4_K"]


def test_the_first_pattern_found_wins_and_the_fallback_still_applies() -> None:
    ov = overrides("ffn_down_exps=q8_0", "ffn_down=Q2_K", "kv_b=q6_k", r"^blk\.[12]\.ffn_up=f16")
    got = assign_types("Q4_K_M", deepseek_v2_lite(3), n_layers=3, n_experts=64, n_head=16, n_head_kv=16, overrides=ov)
    assert got["blk.1.ffn_down_exps.weight"].type == "Q8_0"  # the first pattern, though ffn_down= matches too
    assert got["blk.1.ffn_down_exps.weight"].rule == "--tensor-type ffn_down_exps=Q8_0"
    assert got["blk.2.ffn_down_shexp.weight"].type == "Q2_K"  # rows of 2816 = 11 blocks of 256
    # the dense ffn_down's rows of 10944 are not a multiple of 256: the pattern's Q2_K falls back to Q4_0
    assert got["blk.0.ffn_down.weight"].type == "Q4_0" and got["blk.0.ffn_down.weight"].fallback_from == "Q2_K"
    assert got["blk.1.attn_kv_b.weight"].type == "Q6_K"  # searched, not matched: "kv_b" is inside the name
    assert {got[f"blk.{i}.ffn_up_{kind}.weight"].type for i in (1, 2) for kind in ("exps", "shexp")} == {"F16"}
    assert got["blk.0.ffn_up.weight"].type == "Q4_K"  # ^blk\.[12] does not match block 0


def test_output_and_token_embedding_types_take_no_fallback() -> None:
    untied = llama_types("Q4_K_M", overrides("output=q2_k", "token_embd=q2_k", output="Q8_0", embd="q5_k"))
    assert untied["output.weight"] == "Q8_0" and untied["token_embd.weight"] == "Q5_K"  # before any pattern
    assert llama_types("Q4_K_M", overrides("output=q2_k"))["output.weight"] == "Q2_K"  # a pattern beats the rules
    narrow = [TensorSpec("token_embd.weight", (100, 96)), TensorSpec("output.weight", (100, 96))]
    one = dict(n_layers=1, n_experts=0, n_head=1, n_head_kv=1)
    with pytest.raises(QuantkitError, match=r"output\.weight has rows of 96 weights, not a .* block of 256"):
        assign_types("Q4_K_M", narrow, **one, overrides=overrides(output="Q4_K"))  # type: ignore[arg-type]
    with pytest.raises(QuantkitError, match=r"--token-embedding-type Q6_K: token_embd\.weight"):
        assign_types("Q4_K_M", narrow, **one, overrides=overrides(embd="Q6_K"))  # type: ignore[arg-type]


def test_tied_token_embd_takes_the_output_type_with_the_fallback() -> None:
    tied = [TensorSpec("token_embd.weight", (100, 96)), TensorSpec("blk.0.attn_q.weight", (96, 96))]
    got = assign_types("Q4_K_M", tied, n_layers=1, n_experts=0, n_head=1, n_head_kv=1,
                       overrides=overrides(output="Q4_K"))
    # no output.weight: token_embd is the output and goes through llama_tensor_get_type_impl's output branch,
    # which takes --output-tensor-type; the fallback then moves Q4_K's 256-blocks to Q5_0
    assert got["token_embd.weight"].type == "Q5_0" and got["token_embd.weight"].fallback_from == "Q4_K"
    # --token-embedding-type comes first, tied or not
    got = assign_types("Q4_K_M", tied, n_layers=1, n_experts=0, n_head=1, n_head_kv=1,
                       overrides=overrides(output="Q4_K", embd="Q8_0"))
    assert got["token_embd.weight"].type == "Q8_0"


def test_70b_llama_raises_attn_v() -> None:
    assert is_llama_70b("llama", 80, 0, 64, 8) and is_llama_70b("qwen2", 80, 0, 64, 64)
    assert not is_llama_70b("llama", 80, 0, 64, 64)  # 65B: no grouped KV heads
    assert not is_llama_70b("llama", 80, 8, 64, 8) and not is_llama_70b("llama", 79, 0, 64, 8)
    assert not is_llama_70b("deepseek2", 80, 0, 64, 8)
    specs = llama(80, kv=64)
    more_bits = ["Q6_K" if use_more_bits(i, 80) else "Q5_K" for i in range(80)]
    # Q3_K and Q4_K attn_v become Q5_K: Q2_K's Q4_K (n_gqa 8), Q3_K_S's base, Q4_K_S past its first 4,
    # Q4_K_M off the more-bits layers; Q5_K and Q6_K stay
    for preset, attn_v in (("Q2_K", ["Q5_K"] * 80), ("Q3_K_S", ["Q5_K"] * 80), ("Q4_K_S", ["Q5_K"] * 80),
                           ("Q4_K_M", more_bits), ("Q5_K_S", ["Q5_K"] * 80), ("Q6_K", ["Q6_K"] * 80)):
        got = types(assign_types(preset, specs, n_layers=80, n_experts=0, n_head=64, n_head_kv=8, llama_70b=True))
        plain = types(assign_types(preset, specs, n_layers=80, n_experts=0, n_head=64, n_head_kv=8))
        assert [got[f"blk.{i}.attn_v.weight"] for i in range(80)] == attn_v, preset
        assert {n: t for n, t in got.items() if "attn_v" not in n} == {n: t for n, t in plain.items()
                                                                       if "attn_v" not in n}


@pytest.mark.parametrize(("spec", "error"), [
    ("attn_v", "expected PATTERN=TYPE"), ("=q8_0", "missing tensor name pattern"),
    ("attn_v=", "missing quantization type"), ("attn_v=q9_k", "unknown tensor type 'q9_k' for --tensor-type"),
    ("attn_v[=q8_0", "bad regular expression"), ("x=y=f16", "unknown tensor type 'y=f16'"),
])
def test_bad_tensor_types_are_one_line_errors(spec: str, error: str) -> None:
    with pytest.raises(QuantkitError, match=error.replace("[", r"\[")):
        parse_tensor_types(spec)


def test_tensor_types_parse_as_llama_quantize() -> None:
    parsed = parse_tensor_types(r"ATTN_V=q8_0 blk\.1\.FFN_down=Q6_k")  # patterns lower-cased, types any case
    assert [(p.pattern, p.type) for p in parsed] == [("attn_v", "Q8_0"), (r"blk\.1\.ffn_down", "Q6_K")]
    assert join_tensor_types(["a=q8_0", "b=f16"]) == "a=q8_0 b=f16" and join_tensor_types([]) is None
    with pytest.raises(QuantkitError, match="without spaces"):
        join_tensor_types(["attn v=q8_0"])
