"""What a run reads besides the weights: code in the model directory, tokenizers, datasets, damaged weights.

Cases 5 (foreign code), 8 (garbage dataset), 11 (NaN under GPTQ) and 12 (tokenizer larger than the
model) of the hostile-inputs issue.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from quantkit.model.checkpoint import DEMO_MODEL_DIR
from tests.conftest import copy_tokenizer
from tests.test_cli import assert_one_line_error, run

EVIL = 'open({marker!r}, "w").write("the model directory ran code")\n'
GPTQ = ("--method", "gptq", "--bits", "4", "--group-size", "16", "--num-samples", "2", "--seq-len", "16")


@pytest.fixture
def custom_code_model(tmp_path: Path) -> Path:
    """A directory whose config needs its own Python (auto_map), with a tokenizer and one tensor."""
    path = tmp_path / "custom"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({
        "model_type": "evil_model", "architectures": ["EvilModel"],
        "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"},
    }))
    (path / "evil.py").write_text(EVIL.format(marker=str(path / "evil.py.ran")))
    save_file(load_file(str(DEMO_MODEL_DIR / "model.safetensors")), str(path / "model.safetensors"))
    copy_tokenizer(DEMO_MODEL_DIR, path)
    return path


def test_eval_refuses_model_code_without_trust_remote_code(custom_code_model: Path, test_text: Path) -> None:
    code, _, err = run("eval", "perplexity", custom_code_model, "--dataset", test_text, "--seq-len", "16")
    assert_one_line_error(code, err, "needs Python code from the model directory", "--trust-remote-code")
    assert not (custom_code_model / "evil.py.ran").exists()


def test_trust_remote_code_hands_the_decision_to_transformers(custom_code_model: Path, test_text: Path) -> None:
    """With the flag, transformers is allowed to import the directory's module: our evil.py runs (and the load
    then fails, since it defines no model), proving the flag is what gates it."""
    code, _, err = run("eval", "perplexity", custom_code_model, "--dataset", test_text, "--seq-len", "16",
                       "--trust-remote-code")
    assert_one_line_error(code, err, f"transformers cannot load {custom_code_model}", "EvilConfig")
    assert (custom_code_model / "evil.py.ran").exists()


def test_python_files_are_not_copied_into_the_output(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    model = shutil.copytree(tiny_models["olmoe"], tmp_path / "m")
    (model / "modeling_olmoe.py").write_text(EVIL.format(marker=str(tmp_path / "ran")))
    (model / "run.sh").write_text("echo hi\n")
    code, _, err = run("quantize", model, "--method", "absmax", "--bits", "8", "--out", tmp_path / "q")
    assert code == 0, err
    copied = {p.name for p in (tmp_path / "q").iterdir()}
    assert "modeling_olmoe.py" not in copied and "run.sh" not in copied
    assert "generation_config.json" in copied


def test_garbage_parquet_dataset_is_one_line_error(tmp_path: Path) -> None:
    data = tmp_path / "data.parquet"
    data.write_bytes(b"PAR1 this is not parquet at all" * 10)
    code, _, err = run("calibrate", "--dataset", data, "--num-samples", "2", "--seq-len", "16",
                       "--out", tmp_path / "calib")
    assert_one_line_error(code, err, f"{data} is not a readable parquet file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.parquet"]


@pytest.mark.parametrize("payload", [b"\xff\xfe{not utf-8", b"[" * 100_000])
def test_broken_jsonl_dataset_is_one_line_error(tmp_path: Path, payload: bytes) -> None:
    data = tmp_path / "data.jsonl"
    data.write_bytes(payload)
    code, _, err = run("calibrate", "--dataset", data, "--num-samples", "2", "--seq-len", "16",
                       "--out", tmp_path / "calib")
    assert_one_line_error(code, err, str(data))


def _with_nan(model: Path, target: Path, name: str) -> Path:
    shutil.copytree(model, target)
    weights = load_file(str(target / "model.safetensors"))
    weights[name][0, 0] = float("nan")
    save_file(weights, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


@pytest.mark.parametrize("command", ["gptq", "calibrate"])
def test_nan_weight_is_named_before_calibration_starts(tiny_lm: Path, test_text: Path, tmp_path: Path,
                                                       command: str) -> None:
    bad = "model.layers.1.mlp.experts.3.down_proj.weight"  # the last layer: GPTQ would reach it last
    model = _with_nan(tiny_lm, tmp_path / "m", bad)
    options = GPTQ if command == "gptq" else ("--num-samples", "2", "--seq-len", "16")
    started = time.perf_counter()
    code, _, err = run("quantize" if command == "gptq" else "calibrate", model, *options, "--dataset", test_text,
                       "--out", tmp_path / "out")
    assert_one_line_error(code, err, f"{bad} in model.safetensors contains NaN values")
    assert time.perf_counter() - started < 60
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["gptq", "calibrate", "eval"])
def test_tokenizer_larger_than_the_model_is_named_up_front(tiny_lm: Path, test_text: Path, tmp_path: Path,
                                                           command: str) -> None:
    model = shutil.copytree(tiny_lm, tmp_path / "m")
    for file in model.glob("tokenizer*"):
        file.unlink()
    copy_tokenizer(DEMO_MODEL_DIR, model)  # 4096 tokens for a model with 128 embeddings
    args = {
        "gptq": ("quantize", model, *GPTQ, "--dataset", test_text, "--out", tmp_path / "out"),
        "calibrate": ("calibrate", model, "--num-samples", "2", "--seq-len", "16", "--dataset", test_text,
                      "--out", tmp_path / "out"),
        "eval": ("eval", "perplexity", model, "--dataset", test_text, "--seq-len", "16"),
    }[command]
    code, _, err = run(*args)
    assert_one_line_error(code, err, f"the tokenizer in {model} yields token id", "vocab_size is 128",
                          "do not belong to this model")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["garbage", "truncated", "invalid utf-8"])
def test_corrupt_sentencepiece_model_is_a_one_line_error(damage: str, stories_model: Path, tmp_path: Path) -> None:
    model = shutil.copytree(stories_model, tmp_path / "m")
    spm = model / "tokenizer.model"
    spm.write_bytes({"garbage": b"\x0a\xff\xff\xff\xff\x0fgarbage", "truncated": spm.read_bytes()[:1000],
                     "invalid utf-8": b"\x0a\x03\x0a\x01\xff"}[damage])
    code, _, err = run("quantize", model, "--method", "kquant", "--type", "Q8_0", "--format", "gguf",
                       "--out", tmp_path / "out.gguf")
    assert_one_line_error(code, err, f"{spm} is not a valid SentencePiece model")
    assert not (tmp_path / "out.gguf").exists()
