"""Tiny random models, built from configs, for every supported architecture.

Each is saved with ``save_pretrained`` (so experts are per-expert on disk, fused in memory
as transformers 5 holds them). ``fused_on_disk`` writes transformers' in-memory state dict
as is, so the fused ``experts.gate_up_proj`` / ``experts.down_proj`` land on disk.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
STORIES = SHARED / "models" / "stories260K"

COMMON: dict[str, Any] = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=False,
)
DEEPSEEK: dict[str, Any] = dict(
    n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
    first_k_dense_replace=1, n_group=2, topk_group=1, kv_lora_rank=16, q_lora_rank=None,
    qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, num_key_value_heads=4,
)
ARCH_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {},
    "qwen2": {},
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2, intermediate_size=32),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=64),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16),
    "deepseek_v2": DEEPSEEK,
    "deepseek_v3": DEEPSEEK,
}
MOE_ARCHS = [a for a in ARCH_CONFIGS if a not in ("llama", "qwen2")]


def build_model(model_type: str, seed: int = 0) -> Any:
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    config = transformers.AutoConfig.for_model(model_type, **{**COMMON, **ARCH_CONFIGS[model_type]})
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random routers/experts with some spread, so quantization error is visible
        for param in model.parameters():
            if param.ndim >= 2:
                param.normal_(0, 0.05)
    return model.eval()


def save_model(model: Any, path: Path) -> Path:
    with contextlib.redirect_stderr(io.StringIO()):
        model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """model_type -> checkpoint directory (float32, per-expert names on disk)."""
    root = tmp_path_factory.mktemp("tiny")
    return {arch: save_model(build_model(arch), root / arch) for arch in ARCH_CONFIGS}


@pytest.fixture(scope="session")
def fused_on_disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A qwen3_moe checkpoint whose experts are stored fused, as transformers 5 holds them."""
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("fused") / "qwen3_moe_fused"
    model = build_model("qwen3_moe", seed=1)
    save_model(model, path)
    (path / "model.safetensors").unlink()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    return path


@pytest.fixture(scope="session")
def small_moe(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Decoder layers -> a synthetic Qwen3-MoE checkpoint at half width (32 experts, 110 MB per layer, bf16);
    with stories260K's tokenizer where ../shared has it."""
    from tests.synthetic_checkpoint import build

    root = tmp_path_factory.mktemp("small_moe")
    return {n: build(root / f"layers{n}", "small-moe", layers=n) for n in (1, 3)}


@pytest.fixture(scope="session")
def stories_model() -> Path:
    if not (STORIES / "config.json").is_file():
        pytest.skip("../shared/models/stories260K is absent (a user's clone has no ../shared)")
    return STORIES


TEST_TEXT = (
    "The quick brown fox jumps over the lazy dog. A stitch in time saves nine.\n"
    "Experts are routed by a gate; shared experts see every token.\n"
    " \n"
    "Quantization maps floats to integers with a scale and a zero point.\n"
) * 40


def train_tokenizer(path: Path, vocab_size: int = 120) -> None:
    """A tiny BPE tokenizer (with BOS) saved as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"])
    tokenizer.train_from_iterator([TEST_TEXT], trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(path)


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny DeepSeek-V3 model with a tokenizer, for evaluation tests."""
    path = save_model(build_model("deepseek_v3", seed=3), tmp_path_factory.mktemp("lm") / "deepseek_v3")
    train_tokenizer(path)
    return path


BITNET: dict[str, Any] = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
                              tie_word_embeddings=False)


@pytest.fixture(scope="session")
def bitnet_model(tiny_lm: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama (rows of 256 and 512, a tokenizer) whose every linear weight is ``{-1, 0, +1} x s``, one
    fp16-exact ``s`` per weight: what a model trained ternary (BitNet b1.58) stores."""
    import transformers

    transformers.logging.set_verbosity_error()
    config = transformers.AutoConfig.for_model("llama", **BITNET)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for i, (name, param) in enumerate(model.named_parameters()):
            if param.ndim == 2 and "embed_tokens" not in name:
                trits = torch.randint(-1, 2, tuple(param.shape), generator=generator).to(torch.float32)
                param.copy_(trits * 0.0078125 * (i + 1))
    return copy_tokenizer(tiny_lm, save_model(model, tmp_path_factory.mktemp("bitnet") / "llama"))


@pytest.fixture(scope="session")
def test_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(TEST_TEXT)
    return path


def copy_tokenizer(source: Path, target: Path) -> Path:
    """Give the checkpoint ``target`` the tokenizer files of ``source``."""
    import shutil

    for file in source.iterdir():
        if file.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy2(file, target / file.name)
    return target


def starved_deepseek(tokenizer_dir: Path, root: Path) -> tuple[Path, int]:
    """A tiny DeepSeek-V3 whose layer-1 router never picks its last expert (huge negative bias), with a tokenizer."""
    model = build_model("deepseek_v3", seed=3)
    gate = model.model.layers[1].mlp.gate
    starved = gate.e_score_correction_bias.numel() - 1
    with torch.no_grad():
        gate.e_score_correction_bias[starved] = -1e4
    return copy_tokenizer(tokenizer_dir, save_model(model, root / "starved")), starved
