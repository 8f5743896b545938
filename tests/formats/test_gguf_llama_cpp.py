"""A real client: llama.cpp (llama-cpp-python) loads quantkit's GGUF export and runs it.

F32 exports must give transformers' logits up to float rounding; Q8_0 and k-quant exports stay
close to llama.cpp's own F32 logits (a wrong block layout would give unrelated logits); llama.cpp's
tokenizer built from the exported vocab must tokenize like the Hugging Face tokenizer.

llama-cpp-python is not a dependency; the tests skip without it. It builds from source, e.g.
``CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_OPENMP=OFF" pip install llama-cpp-python`` (or its sdist).
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch

from quantkit.formats.gguf import GgufLayout
from quantkit.formats.gguf.tensors import keeps_f32
from quantkit.formats.output import StoredTensor
from quantkit.kquants import BLOCK_FORMATS, encode
from quantkit.model.checkpoint import Checkpoint
from quantkit.plan import make_plan
from quantkit.recipe import get_preset
from tests.conftest import TEST_TEXT

pytestmark = pytest.mark.slow
llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: no llama.cpp to load GGUFs")

GGML = gguf.GGMLQuantizationType
SAMPLE = TEST_TEXT[:300]
# max |llama.cpp - transformers| / max |transformers| over all positions and the vocab, F32 export
# (measured 3e-7 .. 1.5e-6 with llama-cpp-python 0.3.36: float rounding only)
F32_BOUND = 1e-5
# the same for quantized exports against llama.cpp's F32 logits (llama.cpp also quantizes activations):
# measured 0.025 (Q8_0) and 0.11 (mixed); the demo's Q8_0 export with one layer's experts reversed gives 0.27
QUANT_BOUNDS = {"Q8_0": 0.03, "mixed": 0.15}


def export(checkpoint: Checkpoint, path: Path, scheme: str) -> Path:
    """F32; Q8_0; or "mixed": Q4_K, Q6_K and Q8_0 in turn. F32 for norms/routers, F16 where no block fits the rows."""
    preference = {"F32": [], "Q8_0": ["Q8_0"], "mixed": ["Q4_K", "Q6_K", "Q8_0"]}[scheme]
    layout = GgufLayout(make_plan(checkpoint, get_preset("Q8_0")))

    def items() -> Iterator[StoredTensor]:
        for i, tensor in enumerate(layout.tensors):
            data = layout.load(tensor).numpy()
            turn = preference[i % len(preference):] + preference[: i % len(preference)] if preference else []
            fits = [t for t in turn if tensor.shape[-1] % BLOCK_FORMATS.get(t).block_size == 0]
            if keeps_f32(tensor) or scheme == "F32":
                yield StoredTensor(tensor.name, "F32", data)
            elif not fits:
                yield StoredTensor(tensor.name, "F16", data.astype(np.float16))
            else:
                blocks = encode(fits[0], data.reshape(-1, tensor.shape[-1])).reshape(*tensor.shape[:-1], -1)
                yield StoredTensor(tensor.name, fits[0], blocks)

    layout.write(path, items())
    return path


def llama_cpp_logits(path: Path, tokens: list[int]) -> np.ndarray:
    f32 = int(GGML.F32)  # an F32 KV cache: llama.cpp's default F16 cache alone costs ~1e-3 of the logit scale
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=128, n_batch=128, n_threads=1,
                          type_k=f32, type_v=f32, verbose=False)
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


def transformers_logits(path: Path, tokens: list[int]) -> np.ndarray:
    import transformers

    with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        return model(torch.tensor([tokens])).logits[0].numpy()


def relative_gap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def sample_tokens(path: Path, vocab_size: int) -> list[int]:
    """The sample text's tokens, or 48 random ids for a model without a tokenizer."""
    if (path / "tokenizer.json").is_file():
        import transformers

        return list(transformers.AutoTokenizer.from_pretrained(path)(SAMPLE)["input_ids"][:96])
    return torch.randint(0, vocab_size, (48,), generator=torch.Generator().manual_seed(0)).tolist()


# tiny models with RoPE scaling: contexts past original_max_position_embeddings exercise it
ROPE_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-rope-llama3": ("llama", {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 16}),
    "deepseek_v3-rope-yarn": ("deepseek_v3", {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                              "original_max_position_embeddings": 16, "beta_fast": 32.0,
                                              "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}),
}


def model_path(model: str, request: pytest.FixtureRequest) -> Path:
    """The bundled demo model, stories260K from ../shared (skips when absent), or a tiny random model."""
    if model == "demo":
        return Checkpoint.open(None).path
    if model == "stories260K":
        return Path(request.getfixturevalue("stories_model"))
    tiny: dict[str, Path] = request.getfixturevalue("tiny_models")
    if model not in ROPE_VARIANTS:
        return tiny[model]
    base, rope = ROPE_VARIANTS[model]
    path = shutil.copytree(tiny[base], Path(request.getfixturevalue("tmp_path")) / model)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "rope_parameters": rope}))
    return path


@pytest.mark.parametrize("model", ["demo", "stories260K", "llama", "mixtral", "qwen2_moe", "deepseek_v2",
                                   "deepseek_v3", *ROPE_VARIANTS])
def test_f32_export_runs_in_llama_cpp_with_transformers_logits(
    model: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    path = model_path(model, request)
    checkpoint = Checkpoint.open(path)
    tokens = sample_tokens(path, int(checkpoint.config["vocab_size"]))
    expected = transformers_logits(path, tokens)
    got = llama_cpp_logits(export(checkpoint, tmp_path / "f32.gguf", "F32"), tokens)
    gap = relative_gap(got, expected)
    print(f"{model}: F32 export, {len(tokens)} tokens, max |llama.cpp - transformers| / max |logit| = {gap:.2e}")
    assert gap < F32_BOUND
    assert (got.argmax(-1) == expected.argmax(-1)).mean() > 0.95


@pytest.mark.parametrize(("model", "scheme"), [("demo", "Q8_0"), ("demo", "mixed"), ("stories260K", "Q8_0")])
def test_quantized_export_runs_in_llama_cpp(
    model: str, scheme: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    path = model_path(model, request)
    checkpoint = Checkpoint.open(path)
    tokens = sample_tokens(path, int(checkpoint.config["vocab_size"]))
    reference = llama_cpp_logits(export(checkpoint, tmp_path / "f32.gguf", "F32"), tokens)
    quantized = export(checkpoint, tmp_path / f"{scheme}.gguf", scheme)
    types = {t.tensor_type for t in gguf.GGUFReader(quantized).tensors}
    assert GGML.Q8_0 in types and (scheme != "mixed" or {GGML.Q4_K, GGML.Q6_K} <= types)
    gap = relative_gap(llama_cpp_logits(quantized, tokens), reference)
    print(f"{model}: {scheme} export, max |quantized - F32| / max |logit| = {gap:.2e}")
    assert 0 < gap < QUANT_BOUNDS[scheme]


def llama_cpp_tokens(path: Path, text: str, add_bos: bool) -> list[int]:
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    return list(llm.tokenize(text.encode(), add_bos=add_bos, special=False))


def hf_tokens(path: Path, text: str) -> tuple[list[int], bool]:
    import transformers

    tokenizer: Any = transformers.AutoTokenizer.from_pretrained(path)
    ids = list(tokenizer(text)["input_ids"])
    return ids, bool(ids) and ids[0] == tokenizer.bos_token_id


@pytest.mark.parametrize("model", ["demo", "stories260K", "stories260K-json-only"])
def test_llama_cpp_tokenizes_like_transformers(
    model: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    path = model_path(model.removesuffix("-json-only"), request)
    if model.endswith("-json-only"):  # byte-fallback BPE from tokenizer.json, no tokenizer.model
        path = shutil.copytree(path, tmp_path / "json_only", ignore=shutil.ignore_patterns("tokenizer.model"))
    exported = export(Checkpoint.open(path), tmp_path / "model.gguf", "F32")
    texts = [SAMPLE, "Once upon a time, there was a little girl named Lily.\nThe end."]
    if model == "demo":  # llama.cpp's SentencePiece tokenizer and tokenizers' Metaspace treat space runs differently
        texts.append("  two  spaces\n\n and lines ")
    for text in texts:
        expected, add_bos = hf_tokens(path, text)
        assert llama_cpp_tokens(exported, text, add_bos) == expected, text
