"""llama.cpp GGUF tensor names and imatrix GGUF files (write, read back, importance)."""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from quantkit.calib import imatrix as imx
from quantkit.calib.imatrix import (
    ImatrixMetadata,
    imatrix_entries,
    importance,
    read_imatrix_gguf,
    write_imatrix_gguf,
)
from quantkit.errors import QuantkitError
from quantkit.model.archs import ARCHS, Role, get_arch
from quantkit.model.archs.base import QUANTIZABLE_ROLES
from quantkit.model.checkpoint import Checkpoint
from quantkit.model.gguf_names import GGUF_ARCH, gguf_name
from tests.conftest import ARCH_CONFIGS

EXPECTED_ARCH = {
    "llama": "llama", "qwen2": "qwen2", "mixtral": "llama", "olmoe": "olmoe", "qwen2_moe": "qwen2moe",
    "qwen3_moe": "qwen3moe", "deepseek_v2": "deepseek2", "deepseek_v3": "deepseek2",
}
# GGUF tensor kinds each quantizable role may map to
ROLE_KINDS: dict[Role, set[gguf.MODEL_TENSOR]] = {
    Role.LM_HEAD: {gguf.MODEL_TENSOR.OUTPUT},
    Role.ROUTED_EXPERT: {gguf.MODEL_TENSOR.FFN_GATE_EXP, gguf.MODEL_TENSOR.FFN_UP_EXP, gguf.MODEL_TENSOR.FFN_DOWN_EXP},
    Role.SHARED_EXPERT: {gguf.MODEL_TENSOR.FFN_GATE_SHEXP, gguf.MODEL_TENSOR.FFN_UP_SHEXP,
                         gguf.MODEL_TENSOR.FFN_DOWN_SHEXP},
    Role.DENSE_MLP: {gguf.MODEL_TENSOR.FFN_GATE, gguf.MODEL_TENSOR.FFN_UP, gguf.MODEL_TENSOR.FFN_DOWN},
    Role.ATTENTION: {gguf.MODEL_TENSOR.ATTN_Q, gguf.MODEL_TENSOR.ATTN_K, gguf.MODEL_TENSOR.ATTN_V,
                     gguf.MODEL_TENSOR.ATTN_OUT, gguf.MODEL_TENSOR.ATTN_Q_A, gguf.MODEL_TENSOR.ATTN_Q_B,
                     gguf.MODEL_TENSOR.ATTN_KV_A_MQA, gguf.MODEL_TENSOR.ATTN_KV_B},
}


def known_names(model_type: str, n_layers: int) -> dict[str, gguf.MODEL_TENSOR]:
    """Every ``<name>.weight`` the gguf package defines for the model's GGUF arch, with its kind."""
    arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == GGUF_ARCH[model_type])
    kinds = gguf.MODEL_TENSORS[arch]
    return {f"{gguf.TENSOR_NAMES[t].format(bid=b)}.weight": t for t in kinds for b in range(n_layers)}


def test_every_supported_model_type_has_its_gguf_arch() -> None:
    assert set(ARCHS) <= set(GGUF_ARCH)
    assert GGUF_ARCH == EXPECTED_ARCH


@pytest.mark.parametrize("model_type", list(ARCH_CONFIGS))
def test_every_tensor_maps_and_quantizable_linears_map_to_known_names(
    model_type: str, tiny_models: dict[str, Path]
) -> None:
    checkpoint = Checkpoint.open(tiny_models[model_type])
    n_layers = int(checkpoint.config["num_hidden_layers"])
    spec = get_arch(model_type)
    known = known_names(model_type, n_layers)
    plain: dict[str, str] = {}
    experts: dict[str, dict[int, str]] = {}
    n_quantizable = 0
    for hf_name, info in checkpoint.tensors.items():
        name, expert = gguf_name(model_type, hf_name, n_layers)  # norms, routers, biases map too
        role = spec.role(hf_name)
        if role not in QUANTIZABLE_ROLES or len(info.shape) != 2:
            continue
        n_quantizable += 1
        assert name in known, hf_name
        assert known[name] in ROLE_KINDS[role], (hf_name, name)
        assert (expert is not None) == (role is Role.ROUTED_EXPERT), hf_name
        if expert is None:
            assert plain.setdefault(name, hf_name) == hf_name, f"{hf_name} and {plain[name]} both map to {name}"
        else:
            layer = hf_name.split(".")[2]
            assert name.startswith(f"blk.{layer}.ffn_") and name.endswith("_exps.weight")
            assert experts.setdefault(name, {}).setdefault(expert, hf_name) == hf_name
    assert n_quantizable > 0
    n_experts = spec.num_experts(checkpoint.config)
    for name, by_expert in experts.items():
        assert sorted(by_expert) == list(range(n_experts)), name
    assert not set(plain) & set(experts)


@pytest.mark.parametrize(
    ("model_type", "hf_name", "expected"),
    [
        ("mixtral", "model.layers.1.block_sparse_moe.experts.3.w1.weight", ("blk.1.ffn_gate_exps.weight", 3)),
        ("mixtral", "model.layers.1.block_sparse_moe.experts.3.w3.weight", ("blk.1.ffn_up_exps.weight", 3)),
        ("mixtral", "model.layers.0.block_sparse_moe.experts.0.w2.weight", ("blk.0.ffn_down_exps.weight", 0)),
        ("mixtral", "model.layers.0.block_sparse_moe.gate.weight", ("blk.0.ffn_gate_inp.weight", None)),
        ("qwen3_moe", "model.layers.1.mlp.experts.7.down_proj.weight", ("blk.1.ffn_down_exps.weight", 7)),
        ("olmoe", "model.layers.0.mlp.experts.2.up_proj.weight", ("blk.0.ffn_up_exps.weight", 2)),
        ("qwen2_moe", "model.layers.0.mlp.shared_expert.up_proj.weight", ("blk.0.ffn_up_shexp.weight", None)),
        ("qwen2_moe", "model.layers.0.mlp.shared_expert_gate.weight", ("blk.0.ffn_gate_inp_shexp.weight", None)),
        ("qwen2", "model.layers.1.self_attn.q_proj.bias", ("blk.1.attn_q.bias", None)),
        ("deepseek_v2", "model.layers.1.self_attn.kv_b_proj.weight", ("blk.1.attn_kv_b.weight", None)),
        ("deepseek_v3", "model.layers.1.self_attn.kv_a_proj_with_mqa.weight", ("blk.1.attn_kv_a_mqa.weight", None)),
        ("deepseek_v3", "model.layers.1.self_attn.q_b_proj.weight", ("blk.1.attn_q_b.weight", None)),
        ("deepseek_v3", "model.layers.1.mlp.shared_experts.down_proj.weight", ("blk.1.ffn_down_shexp.weight", None)),
        ("deepseek_v3", "model.layers.1.mlp.gate.e_score_correction_bias", ("blk.1.exp_probs_b.bias", None)),
        ("llama", "lm_head.weight", ("output.weight", None)),
    ],
)
def test_known_names(model_type: str, hf_name: str, expected: tuple[str, int | None]) -> None:
    assert gguf_name(model_type, hf_name, 2) == expected


@pytest.mark.parametrize(
    ("model_type", "hf_name"),
    [
        ("qwen3_moe", "model.layers.2.self_attn.q_proj.weight"),  # beyond num_layers
        ("qwen3_moe", "model.layers.0.mlp.experts.gate_up_proj"),  # fused in-memory name, not on-disk
        ("llama", "model.layers.0.mlp.experts.0.gate_proj.weight"),  # no experts in a dense arch
        ("qwen2", "model.visual.proj.weight"),
        ("gpt2", "lm_head.weight"),
    ],
)
def test_unknown_names_raise_one_line(model_type: str, hf_name: str) -> None:
    with pytest.raises(QuantkitError) as info:
        gguf_name(model_type, hf_name, 2)
    assert "\n" not in str(info.value)


# ---- imatrix entries from per-HF-name statistics ----


def fake_stats(names: dict[str, int], seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """HF name -> ([1, in] float64 sum of squares, [1] int64 count)."""
    gen = torch.Generator().manual_seed(seed)
    return {
        name: (torch.rand(1, width, generator=gen, dtype=torch.float64) * 100,
               torch.randint(0, 1000, (1,), generator=gen))
        for name, width in names.items()
    }


def quantizable_stats(checkpoint: Checkpoint) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    spec = get_arch(checkpoint.model_type)
    names = {n: i.shape[1] for n, i in checkpoint.tensors.items()
             if spec.role(n) in QUANTIZABLE_ROLES and len(i.shape) == 2}
    return fake_stats(names)


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_entries_stack_experts_in_index_order(model_type: str, tiny_models: dict[str, Path]) -> None:
    checkpoint = Checkpoint.open(tiny_models[model_type])
    n_layers = int(checkpoint.config["num_hidden_layers"])
    n_experts = get_arch(model_type).num_experts(checkpoint.config)
    stats = quantizable_stats(checkpoint)
    entries = imatrix_entries(model_type, n_layers, dict(reversed(stats.items())), num_experts=n_experts)
    seen = set()
    for hf_name, (sum_sq, counts) in stats.items():
        name, expert = gguf_name(model_type, hf_name, n_layers)
        seen.add(name)
        merged_sums, merged_counts = entries[name]
        row = 0 if expert is None else expert
        assert merged_sums.shape[0] == merged_counts.shape[0] == (1 if expert is None else n_experts)
        assert torch.equal(merged_sums[row], sum_sq[0]) and torch.equal(merged_counts[row], counts[0])
    assert seen == set(entries)
    assert any(name.endswith("_exps.weight") for name in entries)


def test_missing_expert_is_an_error() -> None:
    stats = fake_stats({f"model.layers.0.mlp.experts.{e}.gate_proj.weight": 64 for e in (0, 1, 3)})
    with pytest.raises(QuantkitError, match=r"blk\.0\.ffn_gate_exps\.weight: no statistics for expert\(s\) 2$"):
        imatrix_entries("qwen3_moe", 2, stats)
    stats = fake_stats({f"model.layers.0.mlp.experts.{e}.gate_proj.weight": 64 for e in (0, 1, 2)})
    assert imatrix_entries("qwen3_moe", 2, stats)["blk.0.ffn_gate_exps.weight"][0].shape == (3, 64)
    with pytest.raises(QuantkitError, match=r"expert\(s\) 3$"):  # the last expert is missing
        imatrix_entries("qwen3_moe", 2, stats, num_experts=4)


def test_entry_shape_errors() -> None:
    rows = {"model.layers.0.mlp.experts.0.up_proj.weight": (torch.ones(2, 8), torch.ones(2))}
    with pytest.raises(QuantkitError, match="one expert but has 2 rows"):
        imatrix_entries("olmoe", 2, rows)
    widths = {"model.layers.0.mlp.experts.0.up_proj.weight": (torch.ones(1, 8), torch.ones(1)),
              "model.layers.0.mlp.experts.1.up_proj.weight": (torch.ones(1, 9), torch.ones(1))}
    with pytest.raises(QuantkitError, match="different input widths"):
        imatrix_entries("olmoe", 2, widths)
    with pytest.raises(QuantkitError, match="expected sum_sq"):
        imatrix_entries("olmoe", 2, {"lm_head.weight": (torch.ones(8), torch.ones(1))})


# ---- the GGUF file ----


def _gguf_str(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def _pad(data: bytes, alignment: int = 32) -> bytes:
    return data + b"\0" * (-len(data) % alignment)


def llama_cpp_bytes(entries: dict[str, tuple[torch.Tensor, torch.Tensor]], datasets: list[str],
                    chunk_count: int, chunk_size: int) -> bytes:
    """The file llama-imatrix's save_imatrix writes for these statistics, built independently of gguf-py.

    KV order as save_imatrix sets them; per sorted entry ``in_sum2`` [in, n_mat] then ``counts`` [1, n_mat],
    both F32; gguf_write_to_buf (ggml/src/gguf.cpp) writes ggml_n_dims dims, pads to 32 before and after data.
    """
    kvs = [
        _gguf_str("general.type") + struct.pack("<I", 8) + _gguf_str("imatrix"),
        _gguf_str("imatrix.datasets") + struct.pack("<IIQ", 9, 8, len(datasets)) + b"".join(map(_gguf_str, datasets)),
        _gguf_str("imatrix.chunk_count") + struct.pack("<II", 4, chunk_count),
        _gguf_str("imatrix.chunk_size") + struct.pack("<II", 4, chunk_size),
    ]
    tensors = []
    for name in sorted(entries):
        sums, counts = entries[name]
        n_mat, n_in = sums.shape
        tensors.append((f"{name}.in_sum2", [n_in, n_mat], sums.to(torch.float32).numpy().tobytes()))
        tensors.append((f"{name}.counts", [1, n_mat], counts.to(torch.float32).numpy().tobytes()))
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs)) + b"".join(kvs)
    offset = 0
    for name, ne, data in tensors:
        while len(ne) > 1 and ne[-1] == 1:  # ggml_n_dims
            ne = ne[:-1]
        out += _gguf_str(name) + struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, 0, offset)
        offset += len(_pad(data))
    out = _pad(out)
    for _, _, data in tensors:
        out += _pad(data)
    return out


def sample_entries() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(3)
    return {
        "blk.1.ffn_gate_exps.weight": (torch.rand(4, 64, generator=gen) * 50, torch.tensor([7, 0, 130, 1])),
        "output.weight": (torch.rand(1, 64, generator=gen, dtype=torch.float64), torch.tensor([512])),
        "blk.0.attn_q.weight": (torch.rand(1, 48, generator=gen), torch.tensor([512.0])),
        "blk.1.ffn_down_exps.weight": (torch.rand(4, 32, generator=gen), torch.tensor([0, 0, 0, 0])),
    }


def test_file_is_byte_identical_to_llama_imatrix(tmp_path: Path) -> None:
    entries = sample_entries()
    path = tmp_path / "imatrix.gguf"
    write_imatrix_gguf(path, entries, ["wiki.train.raw", "code.txt"], 12, 512)
    assert path.read_bytes() == llama_cpp_bytes(entries, ["wiki.train.raw", "code.txt"], 12, 512)


def test_gguf_reader_sees_llama_cpp_layout(tmp_path: Path) -> None:
    path = tmp_path / "imatrix.gguf"
    write_imatrix_gguf(path, sample_entries(), ["calib.txt"], 3, 2048)
    reader = gguf.GGUFReader(path)
    assert [f.name for f in reader.fields.values() if not f.name.startswith("GGUF.")] == [
        "general.type", "imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"]
    assert reader.fields["general.type"].contents() == "imatrix"
    assert reader.fields["imatrix.datasets"].types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING]
    assert reader.fields["imatrix.chunk_count"].types == [gguf.GGUFValueType.UINT32]
    layout = {t.name: (t.shape.tolist(), t.tensor_type) for t in reader.tensors}
    f32 = gguf.GGMLQuantizationType.F32
    assert list(layout) == [  # sorted entry names, in_sum2 before counts
        "blk.0.attn_q.weight.in_sum2", "blk.0.attn_q.weight.counts",
        "blk.1.ffn_down_exps.weight.in_sum2", "blk.1.ffn_down_exps.weight.counts",
        "blk.1.ffn_gate_exps.weight.in_sum2", "blk.1.ffn_gate_exps.weight.counts",
        "output.weight.in_sum2", "output.weight.counts",
    ]
    assert layout["blk.0.attn_q.weight.in_sum2"] == ([48], f32)  # ne, trailing 1 dropped
    assert layout["blk.0.attn_q.weight.counts"] == ([1], f32)
    assert layout["blk.1.ffn_gate_exps.weight.in_sum2"] == ([64, 4], f32)  # one row per expert
    assert layout["blk.1.ffn_gate_exps.weight.counts"] == ([1, 4], f32)


def test_write_read_round_trip_is_exact(tmp_path: Path) -> None:
    entries = sample_entries()
    path = tmp_path / "imatrix.gguf"
    write_imatrix_gguf(path, entries, ["a.txt"], 5, 512)
    back, metadata = read_imatrix_gguf(path)
    assert metadata == ImatrixMetadata(datasets=("a.txt",), chunk_count=5, chunk_size=512)
    assert list(back) == sorted(entries)
    for name, (sums, counts) in entries.items():
        got_sums, got_counts = back[name]
        assert got_sums.dtype == got_counts.dtype == torch.float32
        assert torch.equal(got_sums.view(torch.int32), sums.to(torch.float32).view(torch.int32))
        assert torch.equal(got_counts, counts.to(torch.float32))


def write_raw_imatrix(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    writer = imx._ImatrixWriter(path, arch="")
    writer.add_type("imatrix")
    writer.add_array("imatrix.datasets", ["x"])
    writer.add_uint32("imatrix.chunk_count", 1)
    writer.add_uint32("imatrix.chunk_size", 16)
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_reader_ignores_in_sum_and_checks_pairs(tmp_path: Path) -> None:
    """Newer llama-imatrix adds ``<name>.in_sum``; llama-quantize ignores it, and so do we."""
    k = {"blk.0.attn_k.weight.in_sum2": np.full(8, 2.0, dtype=np.float32),
         "blk.0.attn_k.weight.counts": np.ones(1, dtype=np.float32),
         "blk.0.attn_k.weight.in_sum": np.zeros(8, dtype=np.float32)}
    entries, _ = read_imatrix_gguf(write_raw_imatrix(tmp_path / "newer.gguf", k))
    assert list(entries) == ["blk.0.attn_k.weight"]
    assert torch.equal(entries["blk.0.attn_k.weight"][0], torch.full((1, 8), 2.0))
    v_sums = {"blk.0.attn_v.weight.in_sum2": np.ones(8, np.float32)}
    unpaired = write_raw_imatrix(tmp_path / "unpaired.gguf", {**k, **v_sums})
    with pytest.raises(QuantkitError, match=r"mismatched sums and counts for blk\.0\.attn_v\.weight$"):
        read_imatrix_gguf(unpaired)
    f16 = write_raw_imatrix(tmp_path / "f16.gguf", {**k, "blk.0.attn_k.weight.in_sum2": np.ones(8, np.float16)})
    with pytest.raises(QuantkitError, match="in_sum2 is F16, not F32"):
        read_imatrix_gguf(f16)


def test_reader_rejects_non_imatrix_gguf(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(QuantkitError, match="of type 'model', not an imatrix"):
        read_imatrix_gguf(path)
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(QuantkitError, match="cannot read imatrix"):
        read_imatrix_gguf(tmp_path / "junk.gguf")


def test_importance_matches_llama_quantize() -> None:
    sums = torch.tensor([[3.0, 6.0, 1.0], [5.0, 5.0, 5.0], [0.5, 0.25, 7.0]], dtype=torch.float64)
    counts = torch.tensor([3, 0, 7])
    got = importance(sums, counts)
    assert got.dtype == torch.float32
    with np.errstate(divide="ignore", invalid="ignore"):  # float32 division, as llama-quantize does
        want = sums.numpy().astype(np.float32) / counts.numpy().astype(np.float32)[:, None]
    want[1] = 1.0  # an expert calibration never routed to: uniform weights
    assert np.array_equal(got.numpy(), want)


def test_failed_write_leaves_old_file_and_no_partial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "imatrix.gguf"
    write_imatrix_gguf(path, sample_entries(), ["old.txt"], 1, 512)
    before = path.read_bytes()

    def boom(self: gguf.GGUFWriter, *args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(OSError, match="disk full"):
        write_imatrix_gguf(path, sample_entries(), ["new.txt"], 2, 512)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imatrix.gguf"]

    fresh = tmp_path / "fresh.gguf"
    with pytest.raises(OSError, match="disk full"):
        write_imatrix_gguf(fresh, sample_entries(), ["new.txt"], 2, 512)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imatrix.gguf"]


@pytest.mark.parametrize(
    ("entries", "datasets", "chunk_count", "match"),
    [
        ({"a.weight": (torch.tensor([[float("nan")]]), torch.ones(1))}, ["d"], 1, "non-finite sums"),
        ({"a.weight": (torch.ones(1, 4), torch.tensor([1.5]))}, ["d"], 1, "whole token counts"),
        ({"a.weight": (torch.ones(2, 4), torch.ones(3))}, ["d"], 1, "expected sum_sq"),
        ({"a.weight": (torch.ones(1, 4), torch.ones(1))}, [], 1, "at least one dataset"),
        ({"a.weight": (torch.ones(1, 4), torch.ones(1))}, ["d"], -1, "does not fit in a u32"),
    ],
)
def test_invalid_input_writes_nothing(tmp_path: Path, entries: dict[str, tuple[torch.Tensor, torch.Tensor]],
                                      datasets: list[str], chunk_count: int, match: str) -> None:
    with pytest.raises(QuantkitError, match=match):
        write_imatrix_gguf(tmp_path / "x.gguf", entries, datasets, chunk_count, 512)
    assert list(tmp_path.iterdir()) == []


def test_tiny_model_end_to_end(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """HF-named stats of a whole model -> GGUF file -> back, with llama-quantize's importance per expert."""
    checkpoint = Checkpoint.open(tiny_models["qwen2_moe"])
    n_layers = int(checkpoint.config["num_hidden_layers"])
    stats = quantizable_stats(checkpoint)
    entries = imatrix_entries("qwen2_moe", n_layers, stats)
    path = tmp_path / "qwen2_moe.imatrix.gguf"
    write_imatrix_gguf(path, entries, ["calib.txt"], 4, 512)
    back, _ = read_imatrix_gguf(path)
    assert set(back) == set(entries)
    name, expert = gguf_name("qwen2_moe", "model.layers.1.mlp.experts.2.down_proj.weight", n_layers)
    assert expert == 2
    sum_sq, counts = stats["model.layers.1.mlp.experts.2.down_proj.weight"]
    want = importance(sum_sq, counts)[0]
    assert torch.equal(importance(*back[name])[expert], want)
