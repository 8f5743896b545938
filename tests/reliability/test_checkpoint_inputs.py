"""Checkpoint inputs that must be refused with one line (or, for the hub cache, still load).

Each test builds a tiny checkpoint by hand: a minimal config.json and safetensors shards.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from quantkit.cli import app
from quantkit.errors import QuantkitError
from quantkit.model import checkpoint as checkpoint_module
from quantkit.model.checkpoint import INDEX_FILE, SAFETENSORS_DTYPES, Checkpoint
from tests.conftest import build_model, save_model

MINIMAL_CONFIG = {"model_type": "llama", "hidden_size": 4}
A = torch.arange(8, dtype=torch.float32).reshape(2, 4)
B = torch.ones(4, dtype=torch.float32)


def write_model(
    path: Path,
    shards: dict[str, dict[str, torch.Tensor]],
    index: Any = None,
    config: dict[str, Any] | None = None,
) -> Path:
    """A checkpoint directory at ``path``: config.json, the given shards and (if not None) an index."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(MINIMAL_CONFIG if config is None else config))
    for name, tensors in shards.items():
        save_file(tensors, str(path / name), metadata={"format": "pt"})
    if index is not None:
        (path / INDEX_FILE).write_text(json.dumps(index))
    return path


def open_error(path: Path) -> str:
    """The one-line message of the QuantkitError that opening ``path`` raises."""
    with pytest.raises(QuantkitError) as caught:
        Checkpoint(path)
    message = str(caught.value)
    assert "\n" not in message, message
    return message


# --- 1. nothing outside the model directory ------------------------------------------------------


@pytest.mark.parametrize("shard", ["../../outside/x.safetensors", "ABSOLUTE", "../../../../etc/passwd"])
def test_index_naming_a_file_outside_the_model_is_refused(shard: str, tmp_path: Path) -> None:
    outside = write_model(tmp_path / "outside", {"x.safetensors": {"a": A}})
    if shard == "ABSOLUTE":
        shard = str(outside / "x.safetensors")
    model = write_model(tmp_path / "hub" / "model", {}, index={"weight_map": {"a": shard}})
    message = open_error(model)
    assert message == (
        f"{INDEX_FILE} in {model} names shard {shard!r}, outside the model directory "
        "(absolute paths and '..' are refused)"
    )


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", INDEX_FILE, "tokenizer.json"])
def test_symlink_leading_out_of_the_model_is_refused(name: str, tmp_path: Path) -> None:
    outside = write_model(tmp_path / "outside", {"model.safetensors": {"a": A}})
    (outside / "tokenizer.json").write_text("{}")
    (outside / INDEX_FILE).write_text(json.dumps({"weight_map": {"a": "model.safetensors"}}))
    model = write_model(tmp_path / "model", {"model.safetensors": {"a": A}})
    (model / name).unlink(missing_ok=True)
    (model / name).symlink_to(outside / name)
    message = open_error(model)
    assert message == f"{name} in {model} is a symlink to {outside / name}, outside the model directory"


def hub_snapshot(root: Path, files: dict[str, bytes], snapshots_dir: str = "snapshots") -> Path:
    """A Hugging Face cache entry: each file a blob, linked from ``<snapshots_dir>/<rev>/`` as the hub does."""
    repo = root / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / snapshots_dir / "0123abcd"
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        digest = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / digest).write_bytes(data)
        (snapshot / name).symlink_to(Path("../../blobs") / digest)
    return snapshot


def model_files(tmp_path: Path) -> dict[str, bytes]:
    source = write_model(tmp_path / "source", {"model.safetensors": {"a": A, "b": B}})
    (source / "tokenizer.json").write_text('{"version": "1.0"}')
    return {p.name: p.read_bytes() for p in source.iterdir()}


def test_hub_cache_snapshot_linking_into_blobs_loads(tmp_path: Path) -> None:
    snapshot = hub_snapshot(tmp_path / "hub", model_files(tmp_path))
    checkpoint = Checkpoint(snapshot)
    assert torch.equal(checkpoint.get("a"), A) and torch.equal(checkpoint.get("b"), B)
    assert checkpoint.other_files() == [snapshot / "tokenizer.json"]


def test_blobs_are_trusted_only_from_a_snapshots_directory(tmp_path: Path) -> None:
    not_a_snapshot = hub_snapshot(tmp_path / "hub", model_files(tmp_path), snapshots_dir="elsewhere")
    message = open_error(not_a_snapshot)
    assert message.startswith("config.json in ") and message.endswith(", outside the model directory")


@pytest.mark.parametrize(
    ("weight_map", "fragment"),
    [
        ({"a": 3}, "weight_map['a'] must be a shard file name, got 3"),
        ({"a": None}, "weight_map['a'] must be a shard file name, got null"),
        ({"a": ["model.safetensors"]}, "weight_map['a'] must be a shard file name, got [\"model.safetensors\"]"),
        ({"a": ""}, "weight_map['a'] must be a shard file name, got \"\""),
        ({"": "model.safetensors"}, "weight_map has an empty tensor name"),
        ({}, "weight_map is empty"),
        (["model.safetensors"], "no 'weight_map' object"),
    ],
)
def test_weight_map_must_map_tensor_names_to_file_names(weight_map: Any, fragment: str, tmp_path: Path) -> None:
    model = write_model(tmp_path / "m", {"model.safetensors": {"a": A}}, index={"weight_map": weight_map})
    assert open_error(model) == f"invalid {INDEX_FILE} in {model}: {fragment}"


def test_index_nested_too_deep_is_invalid_json(tmp_path: Path) -> None:
    model = write_model(tmp_path / "m", {"model.safetensors": {"a": A}})
    (model / INDEX_FILE).write_text("[" * 100_000)
    assert open_error(model).startswith(f"invalid JSON in {model / INDEX_FILE}: ")


# --- 2. a tensor in two shards is ambiguous ---------------------------------------------------------


@pytest.mark.parametrize("with_index", [True, False])
def test_tensor_in_two_shards_is_an_error(with_index: bool, tmp_path: Path) -> None:
    first, second = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    shards = {first: {"a": A}, second: {"a": -A, "b": B}}  # the index names the first copy of a
    index = {"weight_map": {"a": first, "b": second}}
    model = write_model(tmp_path / "m", shards, index=index if with_index else None)
    assert open_error(model) == (
        f"tensor a is in two shards of {model}, model-00001-of-00002.safetensors and "
        "model-00002-of-00002.safetensors: which copy is meant is ambiguous"
    )


# --- 3. only known files travel with the weights -----------------------------------------------------


def test_only_known_files_travel_with_the_weights(tmp_path: Path) -> None:
    model = write_model(tmp_path / "m", {"model.safetensors": {"a": A}})
    travelling = [
        "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
        "vocab.json", "vocab.txt", "merges.txt", "spiece.model", "cl100k.tiktoken", "chat_template.jinja",
        "chat_template.json", "generation_config.json", "README.md", "LICENSE", "LICENSE.txt", "LICENCE-MODEL",
        "NOTICE", "USE_POLICY.md",
    ]
    staying = ["modeling_evil.py", "configuration_x.py", "notes.txt", "quantize_config.json", "run.sh", ".hidden"]
    for name in travelling + staying:
        (model / name).write_text("x")
    (model / "tokenizer").mkdir()
    assert [p.name for p in Checkpoint(model).other_files()] == sorted(travelling)


# --- 4. FP8 layouts quantkit does not read are refused at open (tests/model/test_fp8_source.py: the one it reads) --

FP8_CONFIG = {**MINIMAL_CONFIG, "quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
                                                        "activation_scheme": "dynamic", "weight_block_size": [2, 2]}}
W = "model.layers.0.mlp.gate_proj.weight"


def fp8_variant(config_change: dict[str, Any], tensors: dict[str, torch.Tensor]) -> tuple[dict[str, Any], dict]:
    config = json.loads(json.dumps(FP8_CONFIG))
    config["quantization_config"].update(config_change)
    return config, {"model.embed_tokens.weight": A, **tensors}


FP8_REFUSALS = {  # name -> (quantization_config change, tensors, the one-line error)
    "no quantization_config": (None, {W: A.to(torch.float8_e4m3fn), f"{W}_scale_inv": torch.ones(1, 2)},
                               f"{W} in model.safetensors is float8_e4m3fn in a checkpoint whose config.json has no "
                               "fp8 quantization_config: quantkit reads only DeepSeek-V3's block-scaled FP8"),
    "compressed-tensors per-tensor": ({"quant_method": "compressed-tensors"},
                                      {W: A.to(torch.float8_e4m3fn), W.replace("weight", "weight_scale"): B[:1]},
                                      f"{W} in model.safetensors is float8_e4m3fn in a quant_method "
                                      "'compressed-tensors' checkpoint"),
    "per-tensor weight_scale": ({}, {W: A.to(torch.float8_e4m3fn), f"{W}_scale": B[:1]},
                                f"{W} in model.safetensors is FP8 with a per-tensor scale {W}_scale, not block scales"),
    "missing scale": ({}, {W: A.to(torch.float8_e4m3fn)},
                      f"{W} in model.safetensors is FP8 but its block scales {W}_scale_inv are missing"),
    "scale shape mismatch": ({}, {W: A.to(torch.float8_e4m3fn), f"{W}_scale_inv": torch.ones(2, 2)},
                             f"{W}_scale_inv in model.safetensors has shape [2, 2]; [2, 4] in blocks of [2, 2] "
                             "needs [1, 2]"),
    "integer scales": ({}, {W: A.to(torch.float8_e4m3fn), f"{W}_scale_inv": torch.ones(1, 2, dtype=torch.int32)},
                       f"{W}_scale_inv in model.safetensors is int32; FP8 block scales must be float32"),
    "FP8 scales": ({}, {W: A.to(torch.float8_e4m3fn), f"{W}_scale_inv": torch.ones(1, 2).to(torch.float8_e4m3fn)},
                   f"{W}_scale_inv in model.safetensors is float8_e4m3fn; FP8 block scales must be float32"),
    "no block size": ({"weight_block_size": None}, {W: A.to(torch.float8_e4m3fn)},
                      "an fp8 quantization_config without weight_block_size (per-tensor FP8 scales) is not read"),
    "bad block size": ({"weight_block_size": [128, 0]}, {W: A.to(torch.float8_e4m3fn)},
                       "weight_block_size must be two positive integers, got [128, 0]"),
    "static activations": ({"activation_scheme": "static"}, {W: A.to(torch.float8_e4m3fn)},
                           "fp8 activation_scheme 'static' is not read"),
    "fmt disagrees": ({}, {W: A.to(torch.float8_e5m2), f"{W}_scale_inv": torch.ones(1, 2)},
                      f"{W} in model.safetensors is float8_e5m2 but config.json's quantization_config says fmt 'e4m3'"),
    "3-D FP8": ({}, {W: A[None].to(torch.float8_e4m3fn), f"{W}_scale_inv": torch.ones(1, 2)},
                f"{W} in model.safetensors is a 3-D FP8 tensor [1, 2, 4]"),
    "scale of a float weight": ({}, {W: A.clone(), f"{W}_scale_inv": torch.ones(1, 2)},
                                f"{W}_scale_inv in model.safetensors scales {W}, which is float32, not FP8"),
}


@pytest.mark.parametrize("variant", list(FP8_REFUSALS))
def test_unread_fp8_layouts_are_refused_at_open(variant: str, tmp_path: Path) -> None:
    change, tensors, expected = FP8_REFUSALS[variant]
    config, shard = fp8_variant(change or {}, tensors)
    if change is None:
        del config["quantization_config"]
    message = open_error(write_model(tmp_path / "m", {"model.safetensors": shard}, config=config))
    assert expected in message


def test_a_bf16_conversion_whose_config_still_says_fp8_is_read_as_float(tmp_path: Path) -> None:
    """fp8_cast_bf16.py leaves config.json as it was: no FP8 tensor and no scale left, so nothing to dequantize."""
    config, shard = fp8_variant({}, {W: A.clone().to(torch.bfloat16)})
    checkpoint = Checkpoint(write_model(tmp_path / "m", {"model.safetensors": shard}, config=config))
    assert checkpoint.fp8 is not None and not checkpoint.fp8.scales and "quantization_config" not in checkpoint.config
    assert torch.equal(checkpoint.get(W), A.to(torch.bfloat16))


def test_e5m2_and_other_block_sizes_are_read(tmp_path: Path) -> None:
    """fmt e5m2 with 1x3 blocks (a partial last column block): each weight is the FP8 value times its block's scale."""
    scale = torch.tensor([[2.0, 0.5], [4.0, -1.0]])
    config, shard = fp8_variant({"fmt": "e5m2", "weight_block_size": [1, 3]},
                                {W: A.to(torch.float8_e5m2), f"{W}_scale_inv": scale})
    checkpoint = Checkpoint(write_model(tmp_path / "m", {"model.safetensors": shard}, config=config))
    expected = A * torch.tensor([[2.0, 2.0, 2.0, 0.5], [4.0, 4.0, 4.0, -1.0]])
    assert set(checkpoint.tensors) == {"model.embed_tokens.weight", W}
    assert checkpoint.tensors[W].dtype == torch.bfloat16 and "quantization_config" not in checkpoint.config
    assert torch.equal(checkpoint.get(W), expected.to(torch.bfloat16))


# --- 5. config.json's integer sizes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("hidden_size", "256", 'hidden_size must be a positive integer, got "256"'),
        ("hidden_size", True, "hidden_size must be a positive integer, got true"),
        ("hidden_size", 0, "hidden_size must be a positive integer, got 0"),
        ("num_hidden_layers", 2.0, "num_hidden_layers must be a positive integer, got 2.0"),
        ("vocab_size", None, "vocab_size must be a positive integer, got null"),
        ("num_experts", [4], "num_experts must be a positive integer, got [4]"),
        ("q_lora_rank", -1, "q_lora_rank must be a positive integer or null, got -1"),
        ("first_k_dense_replace", -1, "first_k_dense_replace must be a non-negative integer or null, got -1"),
        ("model_type", 3, "model_type must be a string, got 3"),
    ],
)
def test_bad_config_values_are_refused(field: str, value: Any, expected: str, tmp_path: Path) -> None:
    model = write_model(tmp_path / "m", {"model.safetensors": {"a": A}}, config={**MINIMAL_CONFIG, field: value})
    assert open_error(model) == f"config.json in {model}: {expected}"


def test_null_and_zero_where_hugging_face_allows_them(tmp_path: Path) -> None:
    config = {**MINIMAL_CONFIG, "q_lora_rank": None, "num_key_value_heads": None, "first_k_dense_replace": 0}
    model = write_model(tmp_path / "m", {"model.safetensors": {"a": A}}, config=config)
    assert Checkpoint(model).config["q_lora_rank"] is None


# --- 6. malformed shards ------------------------------------------------------------------------------


def test_empty_shard(tmp_path: Path) -> None:
    model = write_model(tmp_path / "m", {})
    (model / "model.safetensors").write_bytes(b"")
    assert open_error(model) == "corrupt shard model.safetensors: the file is empty"


def test_garbage_shard(tmp_path: Path) -> None:
    model = write_model(tmp_path / "m", {})
    (model / "model.safetensors").write_bytes(b"\xff" * 64)
    assert open_error(model).startswith("corrupt shard model.safetensors: ")


@pytest.mark.parametrize("with_index", [True, False])
def test_shard_that_is_a_directory(with_index: bool, tmp_path: Path) -> None:
    index = {"weight_map": {"a": "model-00001.safetensors"}} if with_index else None
    model = write_model(tmp_path / "m", {}, index=index)
    (model / "model-00001.safetensors").mkdir()
    assert open_error(model) == f"shard model-00001.safetensors in {model} is a directory, not a safetensors file"


def test_shard_that_is_a_fifo(tmp_path: Path) -> None:
    model = write_model(tmp_path / "m", {})
    os.mkfifo(model / "model.safetensors")  # opening it would block forever
    assert open_error(model) == f"shard model.safetensors in {model} is not a regular file"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_shard(tmp_path: Path) -> None:
    model = write_model(tmp_path / "m", {"model.safetensors": {"a": A}})
    (model / "model.safetensors").chmod(0)
    assert open_error(model).startswith("cannot read shard model.safetensors: ")


class PanicException(BaseException):
    """Stands in for pyo3's PanicException, which safetensors' Rust code raises when it panics."""


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (PermissionError(13, "Permission denied"), "cannot read shard model.safetensors: Permission denied"),
        (PanicException("index out of bounds\nnote: run with RUST_BACKTRACE=1"),
         "corrupt shard model.safetensors: index out of bounds"),
        (ValueError("bad header"), "corrupt shard model.safetensors: bad header"),
    ],
)
def test_reader_exceptions_become_one_line_errors(
    raised: BaseException, expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = write_model(tmp_path / "m", {"model.safetensors": {"a": A}})

    def failing_open(*args: Any, **kwargs: Any) -> Any:
        raise raised

    monkeypatch.setattr(checkpoint_module, "safe_open", failing_open)
    assert open_error(model) == expected


def test_keyboard_interrupt_is_not_swallowed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = write_model(tmp_path / "m", {"model.safetensors": {"a": A}})

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_module, "safe_open", interrupted)
    with pytest.raises(KeyboardInterrupt):
        Checkpoint(model)


# --- the CLI: exit 2, one line, nothing written --------------------------------------------------------


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_model(build_model("llama"), tmp_path_factory.mktemp("llama") / "llama")


def fp8_weights(model: Path) -> str:
    weights = load_file(str(model / "model.safetensors"))
    name = "model.layers.0.mlp.gate_proj.weight"
    weights[f"{name}_scale_inv"] = torch.ones(1, 1)
    weights[name] = weights[name].to(torch.float8_e4m3fn)
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    return f"{name} in model.safetensors is float8_e4m3fn in a checkpoint whose config.json has no fp8"


def index_outside(model: Path) -> str:
    outside = model.parent / "outside"
    outside.mkdir()
    shutil.move(model / "model.safetensors", outside / "model.safetensors")
    names = load_file(str(outside / "model.safetensors"))
    (model / INDEX_FILE).write_text(json.dumps({"weight_map": dict.fromkeys(names, "../outside/model.safetensors")}))
    return "outside the model directory"


def duplicated_tensor(model: Path) -> str:
    save_file({"lm_head.weight": torch.zeros(128, 64)}, str(model / "model-extra.safetensors"))
    (model / "model.safetensors").rename(model / "model-main.safetensors")
    return "tensor lm_head.weight is in two shards"


def string_hidden_size(model: Path) -> str:
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "hidden_size": "64"}))
    return 'hidden_size must be a positive integer, got "64"'


@pytest.mark.parametrize("spoil", [fp8_weights, index_outside, duplicated_tensor, string_hidden_size])
def test_cli_refuses_bad_checkpoint_with_one_line(spoil: Callable[[Path], str], llama: Path, tmp_path: Path) -> None:
    model = shutil.copytree(llama, tmp_path / "m")
    fragment = spoil(model)
    before = sorted(tmp_path.rglob("*"))
    result = CliRunner().invoke(app, ["quantize", str(model), "--method", "absmax", "--out", str(tmp_path / "q")])
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert result.exit_code == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr
    assert sorted(tmp_path.rglob("*")) == before


# --- fuzzing: only QuantkitError escapes ----------------------------------------------------------------

FUZZ = settings(max_examples=200, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
DTYPES = st.sampled_from([*SAFETENSORS_DTYPES, "F8_E8M0", "F4", "U16", "C64", "x"])
SHAPES = st.lists(st.integers(-2, 2**40), max_size=3) | JSON
OFFSETS = st.lists(st.integers(-1, 80), min_size=2, max_size=2) | JSON
ENTRY = st.fixed_dictionaries({"dtype": DTYPES | JSON, "shape": SHAPES, "data_offsets": OFFSETS})
HEADER = st.dictionaries(st.text(max_size=6), ENTRY | JSON, max_size=4) | JSON


def open_fuzzed(write: Callable[[Path], None]) -> None:
    """Write a fuzzed checkpoint with ``write`` and open it: it loads, or raises QuantkitError."""
    with tempfile.TemporaryDirectory() as tmp:
        model = write_model(Path(tmp) / "model", {"ok.safetensors.part": {"a": A, "b": B}})
        write_model(Path(tmp) / "outside", {"model.safetensors": {"a": A, "b": B}})
        write(model)
        try:
            checkpoint = Checkpoint(model)
        except QuantkitError:
            return
        for file in checkpoint.shard_files:
            assert file.resolve().is_relative_to(model.resolve()), file


@FUZZ
@given(data=st.binary(max_size=300))
def test_fuzz_random_bytes_as_shard(data: bytes) -> None:
    open_fuzzed(lambda model: (model / "model.safetensors").write_bytes(data))


@FUZZ
@given(header=HEADER, length_delta=st.integers(-3, 3), payload=st.binary(max_size=80))
def test_fuzz_header_with_valid_length_prefix(header: Any, length_delta: int, payload: bytes) -> None:
    encoded = json.dumps(header).encode()
    prefix = struct.pack("<Q", max(0, len(encoded) + length_delta))
    open_fuzzed(lambda model: (model / "model.safetensors").write_bytes(prefix + encoded + payload))


SHARD_NAMES = st.sampled_from([
    "model.safetensors", "ok.safetensors.part", "../outside/model.safetensors", "/etc/passwd", "", ".", "..",
    "sub", "sub/../ok.safetensors.part", "./ok.safetensors.part", "a\0b", "config.json", "x" * 300,
]) | st.text(max_size=12)
WEIGHT_MAPS = st.dictionaries(st.sampled_from(["a", "b", ""]) | st.text(max_size=4), SHARD_NAMES | JSON, max_size=4)
INDEXES = st.fixed_dictionaries({"weight_map": WEIGHT_MAPS}) | JSON


@FUZZ
@given(index=INDEXES)
def test_fuzz_index_json(index: Any) -> None:
    def write(model: Path) -> None:
        (model / "sub").mkdir()
        (model / INDEX_FILE).write_text(json.dumps(index))

    open_fuzzed(write)
