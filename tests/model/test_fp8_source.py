"""FP8 sources: a tiny DeepSeek-V3 in the official FP8 layout is read, block by block, as its BF16 conversion.

The FP8 checkpoint is built here the way DeepSeek's is: every decoder linear (``*_proj.weight``, not the
router) is float8_e4m3fn in 128x128 blocks with a float32 ``<name>_scale_inv`` (amax / 448 per block), the
rest bf16, sharded with an index, and ``quantization_config`` in config.json. Its sizes (hidden 160,
intermediate 288) are not multiples of 128, so the last block of rows and columns is partial. Its "twin" is
the BF16 conversion that DeepSeek's ``fp8_cast_bf16.py`` makes, computed here independently; quantkit must
give the same bytes from either.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from quantkit.cli import app
from quantkit.model.checkpoint import Checkpoint
from tests.conftest import COMMON, DEEPSEEK, copy_tokenizer

BLOCK = (128, 128)
FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(BLOCK)}
SIZES = {**COMMON, **DEEPSEEK, "hidden_size": 160, "intermediate_size": 288}  # partial edge blocks
CALIB = ("--num-samples", "4", "--seq-len", "32")
runner = CliRunner()


def to_fp8_blocks(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's layout: each block scaled by amax / 448 into float8_e4m3fn; the scale is stored as scale_inv."""
    rows, cols = weight.shape
    scale = torch.empty(math.ceil(rows / block[0]), math.ceil(cols / block[1]), dtype=torch.float32)
    codes = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            tile = (slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1]))
            scale[i, j] = weight[tile].abs().max() / 448
            codes[tile] = (weight[tile] / scale[i, j]).to(torch.float8_e4m3fn)
    return codes, scale


def to_bf16(codes: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """fp8_cast_bf16.py's weight_dequant, written out plainly: float32 product with each element's block scale."""
    rows, cols = codes.shape
    per_element = scale_inv.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return (codes.to(torch.float32) * per_element).to(torch.bfloat16)


def is_fp8(name: str, tensor: torch.Tensor) -> bool:
    """DeepSeek-V3's FP8 tensors: every linear of the decoder layers (attention, MLP, experts), not the router."""
    return name.startswith("model.layers.") and name.endswith(("_proj.weight", "_proj_with_mqa.weight"))


def build_pair(root: Path, tokenizer_dir: Path, block: tuple[int, int] = BLOCK) -> tuple[Path, Path]:
    """(the FP8 checkpoint in ``block``s, its BF16 conversion), with the tokenizer of ``tokenizer_dir``."""
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(5)
    config = transformers.AutoConfig.for_model("deepseek_v3", **SIZES)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fp8_dir, bf16_dir = root / "fp8" / "model", root / "bf16" / "model"  # one name: GGUF's general.name is it
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim >= 2:
                param.normal_(0, 0.05)
    with contextlib.redirect_stderr(io.StringIO()):
        model.save_pretrained(bf16_dir)
    state = load_file(str(bf16_dir / "model.safetensors"))
    fp8: dict[str, torch.Tensor] = {}
    bf16: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if is_fp8(name, tensor):
            codes, scale = to_fp8_blocks(tensor, block)
            fp8[name], fp8[f"{name}_scale_inv"] = codes, scale
            bf16[name] = to_bf16(codes, scale, block)
        else:
            fp8[name] = bf16[name] = tensor.to(torch.bfloat16)
    save_file(bf16, str(bf16_dir / "model.safetensors"), metadata={"format": "pt"})
    shutil.copytree(bf16_dir, fp8_dir)
    (fp8_dir / "model.safetensors").unlink()
    # layer 0 and the embeddings in one shard, the rest and every scale in the other: scales cross shards
    first = {n for n in fp8 if n.startswith(("model.layers.0.", "model.embed")) and not n.endswith("_scale_inv")}
    shards = {"model-00001-of-00002.safetensors": first, "model-00002-of-00002.safetensors": set(fp8) - first}
    for file, names in shards.items():
        save_file({n: fp8[n] for n in names}, str(fp8_dir / file), metadata={"format": "pt"})
    weight_map = {n: file for file, names in shards.items() for n in sorted(names)}
    (fp8_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config_dict = json.loads((fp8_dir / "config.json").read_text())
    quantization_config = {**FP8_CONFIG, "weight_block_size": list(block)}
    (fp8_dir / "config.json").write_text(json.dumps({**config_dict, "quantization_config": quantization_config}))
    return copy_tokenizer(tokenizer_dir, fp8_dir), copy_tokenizer(tokenizer_dir, bf16_dir)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, tiny_lm: Path) -> tuple[Path, Path]:
    return build_pair(tmp_path_factory.mktemp("fp8"), tiny_lm)


def run(*args: object) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.stderr
    return result.stdout


def test_the_reader_gives_the_official_bf16_conversion(pair: tuple[Path, Path]) -> None:
    fp8, bf16 = Checkpoint(pair[0]), Checkpoint(pair[1])
    assert fp8.fp8 is not None and len(fp8.fp8.scales) > 0
    assert fp8.config == bf16.config  # the fp8 quantization_config is the reader's, not the model's
    assert {n: (i.shape, i.dtype) for n, i in fp8.tensors.items()} == {
        n: (i.shape, i.dtype) for n, i in bf16.tensors.items()}
    partial = [n for n in fp8.fp8.scales if any(d % b for d, b in zip(fp8.tensors[n].shape, BLOCK, strict=True))]
    assert partial and any(min(fp8.tensors[n].shape) > 128 for n in partial)  # several blocks, the last partial
    for name in fp8.tensors:
        assert torch.equal(fp8.get(name), bf16.get(name)), name
    assert fp8.total_bytes() < bf16.total_bytes()  # FP8 on disk: 1 byte a weight plus the scales


def fp8_weights(path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """FP8 weight name -> (its codes, its scale_inv), as stored."""
    stored: dict[str, torch.Tensor] = {}
    for shard in sorted(path.glob("*.safetensors")):
        stored.update(load_file(str(shard)))
    return {n: (t, stored[f"{n}_scale_inv"]) for n, t in stored.items() if t.dtype == torch.float8_e4m3fn}


def test_transformers_dequantization_agrees_with_the_reader(pair: tuple[Path, Path]) -> None:
    """transformers' FP8 dequantization with the configured block size, in float32 then bf16, gives the same weights.

    ``_dequantize_fp8_weight`` (its FP8 linears' backward pass) takes ``weight_block_size`` and handles partial
    edge blocks; its loader's ``Fp8Dequantize`` infers the block from the scale grid instead, which holds only
    when the blocks are whole (the next test).
    """
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    checkpoint = Checkpoint(pair[0])
    weights = fp8_weights(pair[0])
    assert checkpoint.fp8 is not None and weights.keys() == checkpoint.fp8.scales.keys()
    for name, (codes, scale) in weights.items():
        theirs = _dequantize_fp8_weight(codes, scale, list(BLOCK), torch.float32).to(torch.bfloat16)
        assert torch.equal(checkpoint.get(name), theirs), name


def test_transformers_loader_agrees_where_the_blocks_are_whole(tmp_path: Path, tiny_lm: Path) -> None:
    """8x16 blocks divide every size of the tiny model: transformers' loading dequantization is quantkit's reader.

    With accelerate installed, ``from_pretrained`` with ``FineGrainedFP8Config(dequantize=True)`` (what
    transformers does on a machine without a recent GPU) loads the same model as quantkit's loader.
    """
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    fp8, _ = build_pair(tmp_path, tiny_lm, block=(8, 16))
    checkpoint = Checkpoint(fp8)
    for name, (codes, scale) in fp8_weights(fp8).items():
        theirs = Fp8Dequantize(None)._dequantize_one(codes, scale, output_dtype=torch.bfloat16)
        assert torch.equal(checkpoint.get(name), theirs), name
    try:
        import accelerate  # noqa: F401  transformers' FP8 quantizer requires it, even to dequantize
    except ImportError:
        return  # the direct comparison above stands; the loader itself needs accelerate (not a quantkit dependency)
    import transformers

    from quantkit.formats.load import load_quantized

    config = transformers.FineGrainedFP8Config(dequantize=True)
    with contextlib.redirect_stderr(io.StringIO()):
        theirs = transformers.AutoModelForCausalLM.from_pretrained(fp8, dtype=torch.bfloat16,
                                                                   quantization_config=config).state_dict()
    ours = load_quantized(fp8, dtype=torch.bfloat16).state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


QUANTIZE_CASES = {
    "absmax-compressed-tensors": ("--method", "absmax", "--bits", "4", "--group-size", "32"),
    "gptq": ("--method", "gptq", "--bits", "4", "--group-size", "32", *CALIB),
    "gguf-Q4_K_M": ("--preset", "Q4_K_M", "--format", "gguf"),
}


@pytest.mark.parametrize("case", list(QUANTIZE_CASES))
def test_quantize_gives_the_bytes_of_the_bf16_conversion(case: str, pair: tuple[Path, Path], tmp_path: Path) -> None:
    gguf = "gguf" in case
    outputs = []
    for model in pair:
        out = tmp_path / (model.parent.name + (".gguf" if gguf else ""))
        run("quantize", model, *QUANTIZE_CASES[case], "--out", out)
        outputs.append(out)
    fp8_out, bf16_out = outputs
    if gguf:
        assert fp8_out.read_bytes() == bf16_out.read_bytes()
        report_files = [o.with_name(o.stem + ".quantkit_report.json") for o in outputs]
    else:
        names = sorted(p.name for p in fp8_out.iterdir())
        assert names == sorted(p.name for p in bf16_out.iterdir())
        for name in names:
            if name != "quantkit_report.json":
                assert (fp8_out / name).read_bytes() == (bf16_out / name).read_bytes(), name
        assert json.loads((fp8_out / "config.json").read_text())["quantization_config"]["quant_method"] != "fp8"
        report_files = [o / "quantkit_report.json" for o in outputs]
    reports = [json.loads(f.read_text()) for f in report_files]
    assert [_records(r) for r in reports[:1]] == [_records(r) for r in reports[1:]]
    assert any("source weights: FP8 (e4m3, 128x128 block scales), read as bfloat16" in n for n in reports[0]["notes"])


def _records(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [{k: v for k, v in t.items() if k != "seconds"} for t in report["tensors"]]


def test_inspect_calibrate_and_eval_read_the_fp8_checkpoint(pair: tuple[Path, Path], test_text: Path,
                                                            tmp_path: Path) -> None:
    infos = [json.loads(run("inspect", model, "--json")) for model in pair]
    assert infos[0]["source_weights"] == "FP8 (e4m3, 128x128 block scales), read as bfloat16"
    assert infos[1]["source_weights"] is None
    assert infos[0]["plan"] == infos[1]["plan"] and infos[0]["params"] == infos[1]["params"]
    assert infos[0]["original_size_mb"] < infos[1]["original_size_mb"]
    assert "source weights" in run("inspect", pair[0]) and "source weights" not in run("inspect", pair[1])
    statistics, ppl = [], []
    for model in pair:
        kind = model.parent.name
        run("calibrate", model, "--dataset", test_text, *CALIB, "--out", tmp_path / f"calib-{kind}")
        statistics.append(load_file(str(tmp_path / f"calib-{kind}" / "statistics.safetensors")))
        run("eval", "perplexity", model, "--dataset", test_text, "--seq-len", 64, "--save", tmp_path / f"{kind}.json")
        ppl.append(json.loads((tmp_path / f"{kind}.json").read_text())["ppl"])
    assert statistics[0].keys() == statistics[1].keys()
    assert all(torch.equal(statistics[0][k], statistics[1][k]) for k in statistics[0])
    assert ppl[0] == ppl[1] and math.isfinite(ppl[0])


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_scale_is_refused_with_one_line(value: float, pair: tuple[Path, Path], tmp_path: Path) -> None:
    model = shutil.copytree(pair[0], tmp_path / "m")
    shard = model / "model-00002-of-00002.safetensors"
    tensors = load_file(str(shard))
    name = "model.layers.1.mlp.experts.3.down_proj.weight"
    tensors[f"{name}_scale_inv"][0, 0] = value
    save_file(tensors, str(shard), metadata={"format": "pt"})
    result = runner.invoke(app, ["quantize", str(model), "--method", "absmax", "--out", str(tmp_path / "q")])
    assert result.exit_code == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    expected = f"{name} (FP8 times {name}_scale_inv) in model-00002-of-00002.safetensors contains "
    assert len(lines) == 1 and expected in lines[0], result.stderr  # NaN or Inf: inf times a zero code is NaN
