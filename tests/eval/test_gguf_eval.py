"""``eval perplexity`` on GGUF files: the same protocols, KL and top-1 against ``--base``, either side a GGUF.

A GGUF and its ggml-blocks twin (the same quantization, ``--format ggml``) hold the same blocks, so they must
score the same; an F32 export must score as the float model, for every architecture quantkit exports.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from quantkit.cli import app
from quantkit.eval.run import EvalSettings, run_perplexity
from tests.formats.test_gguf_read import EXPORTED, export_f32

runner = CliRunner()
GGUF_PATH = "GGUF dequantized through the gguf package"


def quantize(model: Path, out: Path, *args: str) -> Path:
    result = runner.invoke(app, ["quantize", str(model), *args, "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    return out


def test_q8_0_gguf_scores_as_its_ggml_twin(tiny_lm: Path, test_text: Path, tmp_path: Path) -> None:
    q8_0 = ("--method", "kquant", "--type", "Q8_0")
    gguf_file = quantize(tiny_lm, tmp_path / "q8.gguf", *q8_0, "--format", "gguf")
    twin = quantize(tiny_lm, tmp_path / "q8", *q8_0, "--format", "ggml")
    settings = EvalSettings(dataset=str(test_text), seq_len=64)
    ours = run_perplexity(gguf_file, settings, base=tiny_lm)
    theirs = run_perplexity(twin, settings, base=tiny_lm)
    assert ours["ppl"] == pytest.approx(theirs["ppl"], rel=1e-6)
    assert ours["kl"] == pytest.approx(theirs["kl"], rel=1e-4) and ours["kl"] > 0
    assert ours["top1_agreement"] == theirs["top1_agreement"]
    assert ours["loaded"]["model"].startswith(GGUF_PATH) and "Q8_0" in ours["loaded"]["model"]
    assert ours["tokenizer"] == str(tiny_lm)  # the base's Hugging Face tokenizer, before the GGUF's own
    as_base = run_perplexity(twin, settings, base=export_f32(tiny_lm, tmp_path / "f32.gguf"))  # GGUF on either side
    assert as_base["kl"] == pytest.approx(theirs["kl"], rel=1e-4)
    assert as_base["base_ppl"] == pytest.approx(theirs["base_ppl"], rel=1e-5)


@pytest.mark.parametrize("arch", EXPORTED)
def test_f32_gguf_scores_as_the_float_model(arch: str, tiny_models: dict[str, Path], tiny_lm: Path,
                                            test_text: Path, tmp_path: Path) -> None:
    path = export_f32(tiny_models[arch], tmp_path / f"{arch}.gguf")
    settings = EvalSettings(dataset=str(test_text), seq_len=64, max_windows=8, tokenizer=str(tiny_lm))
    result = run_perplexity(path, settings, base=tiny_models[arch])
    assert result["ppl"] == pytest.approx(result["base_ppl"], rel=1e-5)
    assert result["kl"] == pytest.approx(0.0, abs=1e-6) and result["top1_agreement"] > 0.99
    assert result["tokenizer"] == str(tiny_lm)


def test_cli_says_how_it_read_the_gguf(tiny_lm: Path, test_text: Path, tmp_path: Path) -> None:
    path = export_f32(tiny_lm, tmp_path / "model.gguf")
    result = runner.invoke(app, ["eval", "perplexity", str(path), "--tokenizer", str(tiny_lm), "--dataset",
                                 str(test_text), "--seq-len", "64", "--max-windows", "2"])
    assert result.exit_code == 0, result.stderr
    assert "GGUF dequantized through" in result.stdout and "tokenizer" in result.stdout


def test_gguf_without_a_usable_tokenizer_asks_for_one(tiny_lm: Path, test_text: Path, tmp_path: Path) -> None:
    """transformers rebuilds no deepseek2 tokenizer from GGUF metadata: one line that names --tokenizer."""
    path = export_f32(tiny_lm, tmp_path / "model.gguf")
    result = runner.invoke(app, ["eval", "perplexity", str(path), "--dataset", str(test_text), "--seq-len", "64"])
    assert result.exit_code == 2 and "--tokenizer" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("where", ["model", "base"])
def test_bad_gguf_from_the_cli_is_one_line(where: str, tiny_lm: Path, test_text: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(export_f32(tiny_lm, tmp_path / "model.gguf").read_bytes()[:5000])
    model, base = (bad, tiny_lm) if where == "model" else (tiny_lm, bad)
    result = runner.invoke(app, ["eval", "perplexity", str(model), "--base", str(base), "--tokenizer", str(tiny_lm),
                                 "--dataset", str(test_text), "--seq-len", "64"])
    assert result.exit_code == 2 and str(bad) in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_stories260k_gguf_exports(stories_model: Path, tmp_path: Path) -> None:
    """The real model: F32 GGUF = float, Q8_0 and Q4_K_M GGUF = their ggml twins; the GGUF's own tokenizer (llama
    SentencePiece, rebuilt by transformers) tokenizes as the Hugging Face one."""
    text = stories_model.parents[1] / "data" / "tinystories" / "tinystories_val.txt"
    if not text.is_file():
        pytest.skip("../shared/data/tinystories is absent")
    settings = EvalSettings(dataset=str(text), protocol="llamacpp", seq_len=256, max_windows=16)
    f32 = run_perplexity(export_f32(stories_model, tmp_path / "f32.gguf"), settings)
    assert f32["tokenizer"].endswith("(GGUF metadata, rebuilt by transformers)")
    assert f32["ppl"] == pytest.approx(run_perplexity(stories_model, settings)["ppl"], rel=1e-5)
    for preset in (("--method", "kquant", "--type", "Q8_0"), ("--preset", "Q4_K_M")):
        name = preset[-1]
        gguf_file = quantize(stories_model, tmp_path / f"{name}.gguf", *preset, "--format", "gguf")
        twin = quantize(stories_model, tmp_path / name, *preset, "--format", "ggml")
        ours = run_perplexity(gguf_file, settings, base=stories_model)
        theirs = run_perplexity(twin, settings, base=stories_model)
        assert ours["ppl"] == pytest.approx(theirs["ppl"], rel=1e-6), name
        assert ours["kl"] == pytest.approx(theirs["kl"], rel=1e-4), name


def test_tokenizer_beyond_the_gguf_vocabulary_is_refused(tiny_models: dict[str, Path], test_text: Path,
                                                          tmp_path: Path) -> None:
    from quantkit.model.checkpoint import DEMO_MODEL_DIR

    path = export_f32(tiny_models["llama"], tmp_path / "llama.gguf")  # 128 embeddings; the demo tokenizer has 4096
    result = runner.invoke(app, ["eval", "perplexity", str(path), "--tokenizer", str(DEMO_MODEL_DIR),
                                 "--dataset", str(test_text), "--seq-len", "64"])
    assert result.exit_code == 2 and "vocab_size is 128" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
