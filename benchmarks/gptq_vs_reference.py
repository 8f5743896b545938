"""quantkit's GPTQ against the IST-DASLab reference, side by side on stories260K, over several seeds.

Both quantize ``../shared/models/stories260K`` (a real trained Llama; every linear of its 5 layers, 35
weights; embeddings tied and float) from the *same* calibration windows: the first half of
TinyStories ``tinystories_val.txt`` (cut at a story boundary), tokenized by quantkit's
``windows_for`` (the function ``quantize`` itself uses) with each seed; the reference is handed the
resulting ``input_ids``. Settings: bits 3 and 4; per-channel and groups of 48 (rows of 64 end in a
group of 16, the 172-wide ``down_proj`` rows in one of 28); act-order off and on; asymmetric
(zero-point) grid, dampening 0.01, block size 128, float32 throughout.

The reference is the IST-DASLab/gptq checkout named by ``--reference`` or ``QUANTKIT_GPTQ_REFERENCE``
(its ``gptq.py`` and ``quant.py``; nothing of it is in this repository). ``llama.py`` needs CUDA, so
:func:`reference_sequential` is a CPU transcription of its ``llama_sequential`` with ``--true-sequential``
(as its README runs LLaMA; quantkit is true-sequential by default): the same layer and sub-layer order,
one calibration window per forward, ``GPTQ.add_batch`` from forward hooks and ``GPTQ.fasterquant``,
with ``Quantizer.configure(bits, perchannel=True, sym=False, mse=False)``. Its only adaptations: no
``.to(dev)``/``.cuda()``; ``torch.cuda.synchronize`` (called by ``fasterquant``) is a no-op while it
runs; the layer keyword arguments are captured whole (transformers 5 layers need
``position_embeddings``, not only the mask and positions ``llama.py`` captures) and a layer's output
is a tensor, not a tuple.

Both results are evaluated by quantkit's protocol on the first ``--eval-windows`` 512-token windows (gptq
protocol) of the held-out second half: quantkit's output is loaded back by quantkit's loader, the
reference's ``Q`` is written into a copy of the float model; perplexity and KL(float || quantized)
come from the same ``evaluate`` call against the same float model. RTN (zeropoint, same bits and
groups) is the no-Hessian baseline.

    python benchmarks/gptq_vs_reference.py --reference /path/to/gptq [--seeds 0 1 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from quantkit.api import CalibrationSettings, QuantizeOptions, quantize
from quantkit.calib.run import windows_for
from quantkit.eval.perplexity import evaluate
from quantkit.eval.run import load_model
from quantkit.eval.windows import Window, make_windows
from quantkit.model.checkpoint import Checkpoint
from quantkit.model.tokenizer import load_tokenizer
from quantkit.recipe import get_preset
from quantkit.schemes.gptq import GptqConfig
from quantkit.schemes.gptq_solver import GROUP_FITS, gptq_quantize

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT.parent / "shared" / "models" / "stories260K"
TEXT = ROOT.parent / "shared" / "data" / "tinystories" / "tinystories_val.txt"
RESULTS = ROOT / "benchmarks" / "results" / "gptq_vs_reference.json"
REFERENCE_ENV = "QUANTKIT_GPTQ_REFERENCE"
EVAL_SEQ_LEN = 512
DEFAULT_GROUP_FIT = GptqConfig("gptq").group_fit  # results before 2026-12-06 used "current" under impl "quantkit"
# llama.py's true-sequential groups: the linears of a group share one Hessian pass
SEQUENTIAL = [["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"], ["self_attn.o_proj"],
              ["mlp.up_proj", "mlp.gate_proj"], ["mlp.down_proj"]]
Setting = tuple[int, int | None, bool]  # bits, group size (None: per channel), act-order


def settings_for(group_size: int) -> list[Setting]:
    """Bits 4 and 3, per channel and in groups of ``group_size``, act-order off and on."""
    return [(bits, group, act) for bits in (4, 3) for group in (None, group_size) for act in (False, True)]


def setting_name(bits: int, group: int | None, act_order: bool) -> str:
    return f"w{bits}-{'channel' if group is None else f'g{group}'}{'-act' if act_order else ''}"


# --- the reference, imported from its checkout


def import_reference(path: str | None) -> tuple[ModuleType, ModuleType]:
    """The reference's ``gptq`` and ``quant`` modules from the checkout at ``path``; exits if absent."""
    if not path:
        sys.exit(f"no reference checkout: pass --reference DIR or set {REFERENCE_ENV} to a clone of "
                 "https://github.com/IST-DASLab/gptq (its gptq.py and quant.py are imported from there)")
    folder = Path(path).resolve()
    missing = [name for name in ("gptq.py", "quant.py") if not (folder / name).is_file()]
    if missing:
        sys.exit(f"{folder} is not an IST-DASLab/gptq checkout: {', '.join(missing)} missing")
    sys.path.insert(0, str(folder))
    modules = importlib.import_module("gptq"), importlib.import_module("quant")
    for module in modules:
        if Path(module.__file__ or "").resolve().parent != folder:
            sys.exit(f"`import {module.__name__}` found {module.__file__}, not the checkout at {folder}")
    return modules


@contextlib.contextmanager
def cpu_only_reference() -> Iterator[io.StringIO]:
    """``torch.cuda.synchronize`` as a no-op, and the reference's prints captured."""
    synchronize = torch.cuda.synchronize
    torch.cuda.synchronize = lambda *args, **kwargs: None
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            yield printed
    finally:
        torch.cuda.synchronize = synchronize


def _hidden(output: Any) -> torch.Tensor:
    """A decoder layer's output hidden states ``[1, seq, hidden]`` (a tuple's first item before transformers 5)."""
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def reference_sequential(model: Any, input_ids: torch.Tensor, bits: int, group: int | None, act_order: bool,
                         gptq: ModuleType, quant: ModuleType, block_size: int = 128) -> None:
    """llama.py's ``llama_sequential`` on CPU: quantizes ``model``'s decoder linears in place.

    ``block_size`` is ``fasterquant``'s (llama.py leaves it at 128); a multiple of the group size makes the
    reference take every group's parameters from the current weights, as quantkit does.
    """
    model.config.use_cache = False
    layers = model.model.layers
    nsamples = input_ids.shape[0]
    inps = torch.zeros((nsamples, input_ids.shape[1], model.config.hidden_size), dtype=torch.float32)
    cache: dict[str, Any] = {"i": 0, "kwargs": None}

    class Catcher(nn.Module):
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

        def forward(self, inp: torch.Tensor, **kwargs: Any) -> None:
            inps[cache["i"]] = inp
            cache["i"] += 1
            cache["kwargs"] = kwargs
            raise ValueError

    layers[0] = Catcher(layers[0])
    for j in range(nsamples):  # the reference's dataloader yields one window per batch
        with contextlib.suppress(ValueError):
            model(input_ids[j : j + 1])
    layers[0] = layers[0].module
    kwargs = cache["kwargs"]
    outs = torch.zeros_like(inps)

    for i in range(len(layers)):
        layer = layers[i]
        full = {name: module for name, module in layer.named_modules() if isinstance(module, nn.Linear)}
        for names in SEQUENTIAL:
            subset = {n: full[n] for n in names}
            solvers = {}
            for name in subset:
                solvers[name] = gptq.GPTQ(subset[name])
                solvers[name].quantizer = quant.Quantizer()
                solvers[name].quantizer.configure(bits, perchannel=True, sym=False, mse=False)

            handles = [subset[name].register_forward_hook(add_batch(solvers[name])) for name in subset]
            for j in range(nsamples):
                outs[j] = _hidden(layer(inps[j].unsqueeze(0), **kwargs))[0]
            for handle in handles:
                handle.remove()
            for name in subset:
                solvers[name].fasterquant(blocksize=block_size, percdamp=0.01, groupsize=group or -1,
                                          actorder=act_order, static_groups=False)
                solvers[name].free()
        for j in range(nsamples):
            outs[j] = _hidden(layer(inps[j].unsqueeze(0), **kwargs))[0]
        inps, outs = outs, inps


def add_batch(solver: Any) -> Any:
    """llama.py's forward hook: the linear's input goes to ``GPTQ.add_batch``."""
    def hook(_: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        solver.add_batch(inp[0].data, out.data)
    return hook


@torch.no_grad()
def same_hessian_errors(model: Any, input_ids: torch.Tensor, gptq: ModuleType, quant: ModuleType,
                        settings: list[Setting]) -> dict[str, dict[str, Any]]:
    """Both solvers on the same Hessians (the float model's inputs, no sequential update), per setting:
    the summed output error ``tr((W - Q) H (W - Q)^T)`` over the 35 weights of quantkit, the reference and
    RTN, and on how many weights quantkit's is at most the reference's."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}
    sums = {name: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for name, m in linears.items()}

    def accumulate(name: str) -> Any:
        def hook(_: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            x = inp[0].reshape(-1, inp[0].shape[-1]).double()
            sums[name] += 2 * x.T @ x / input_ids.numel()
        return hook

    handles = [m.register_forward_hook(accumulate(name)) for name, m in linears.items()]
    for batch in input_ids.split(8):
        model(batch)
    for handle in handles:
        handle.remove()
    out: dict[str, dict[str, Any]] = {}
    for bits, group, act_order in settings:
        errors = {"quantkit": 0.0, "quantkit-current": 0.0, "reference": 0.0, "rtn": 0.0}
        at_most = 0
        for name, module in linears.items():
            H, W = sums[name], module.weight.detach()
            ours = gptq_quantize(W, H.float(), bits=bits, group_size=group, act_order=act_order,
                                 scale_dtype=torch.float32).dequantized
            current = gptq_quantize(W, H.float(), bits=bits, group_size=group, act_order=act_order,
                                    scale_dtype=torch.float32, group_fit="current").dequantized
            nearest = gptq_quantize(W, torch.eye(W.shape[1]), bits=bits, group_size=group,
                                    scale_dtype=torch.float32).dequantized
            linear = nn.Linear(W.shape[1], W.shape[0], bias=False)
            linear.weight.data = W.clone()
            solver = gptq.GPTQ(linear)
            solver.quantizer = quant.Quantizer()
            solver.quantizer.configure(bits, perchannel=True, sym=False, mse=False)
            solver.H, solver.nsamples = H.float(), input_ids.shape[0]
            with cpu_only_reference():
                solver.fasterquant(percdamp=0.01, groupsize=group or -1, actorder=act_order)
            error = {impl: float(((W - Q).double() @ H * (W - Q).double()).sum())
                     for impl, Q in (("quantkit", ours), ("quantkit-current", current),
                                     ("reference", linear.weight.data), ("rtn", nearest))}
            errors = {impl: errors[impl] + error[impl] for impl in errors}
            at_most += error["quantkit"] <= error["reference"]
        out[setting_name(bits, group, act_order)] = {**errors, "quantkit_at_most_reference": at_most,
                                                     "weights": len(linears)}
    return out


# --- data and evaluation


def split_text(folder: Path) -> tuple[Path, Path]:
    """The calibration half and the held-out half of TinyStories, cut at the story boundary nearest the middle."""
    text = TEXT.read_text()
    cut = text.index("\n\n", len(text) // 2) + 2
    calibration, held_out = folder / "calibration.txt", folder / "held_out.txt"
    calibration.write_text(text[:cut])
    held_out.write_text(text[cut:])
    return calibration, held_out


def eval_windows(held_out: Path, count: int) -> list[Window]:
    """The first ``count`` windows of the held-out text (gptq protocol: every token after a window's first scored)."""
    tokenizer = load_tokenizer(MODEL)
    ids = torch.tensor(tokenizer(held_out.read_text(), verbose=False)["input_ids"], dtype=torch.long)
    return make_windows(ids, "gptq", EVAL_SEQ_LEN)[:count]


def scores(model: Any, float_model: Any, windows: list[Window]) -> dict[str, float]:
    result = evaluate(model, windows, base=float_model, batch_size=8)
    assert result.kl is not None and result.top1_agreement is not None
    return {"ppl": result.model.ppl, "kl": result.kl, "top1": result.top1_agreement}


def run_quantkit(method: str, bits: int, group: int | None, act_order: bool, data: CalibrationSettings | None,
                 out: Path, group_fit: str = DEFAULT_GROUP_FIT) -> tuple[Any, float]:
    """quantkit's output for one setting, loaded back by its loader, and the quantize seconds."""
    changes: dict[str, Any] = {"method": method, "bits": bits, "group_size": group or -1}
    if method == "gptq":
        changes.update(act_order=act_order, group_fit=group_fit)
    started = time.perf_counter()
    report = quantize(MODEL, get_preset("int8").with_default(**changes), out,
                      options=QuantizeOptions(data=data, show_progress=False, overwrite=True))
    seconds = time.perf_counter() - started
    quantized = [t for t in report.tensors if t.bits is not None]
    assert len(quantized) == 35, f"expected the 35 decoder linears quantized, got {len(quantized)}"
    return load_model(out, torch.float32, "cpu"), seconds


def summary(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reference", default=os.environ.get(REFERENCE_ENV),
                        help=f"IST-DASLab/gptq checkout (default: ${REFERENCE_ENV})")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--thread-check", type=int, default=0,
                        help="also run quantkit's first seed with this many threads (0: skip)")
    parser.add_argument("--num-samples", type=int, default=128, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=256, help="calibration window length")
    parser.add_argument("--batch-size", type=int, default=4,
                        help="quantkit's calibration batch (the reference runs one window at a time)")
    parser.add_argument("--eval-windows", type=int, default=128, help="held-out windows of 512 tokens scored")
    parser.add_argument("--only", nargs="+", help="setting names to run, e.g. w3-g48-act")
    parser.add_argument("--group-fit", nargs="+", choices=GROUP_FITS, default=[DEFAULT_GROUP_FIT],
                        help=f"quantkit's group-fit rules to run (impl 'quantkit' for {DEFAULT_GROUP_FIT}, the "
                        "default and the reference's rule; 'quantkit-current' for current)")
    parser.add_argument("--group-size", type=int, default=48, help="the grouped settings' group size")
    parser.add_argument("--skip-reference", action="store_true", help="run quantkit and RTN only")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where to write the results")
    args = parser.parse_args()
    gptq, quant = import_reference(args.reference)
    if not MODEL.is_dir() or not TEXT.is_file():
        sys.exit(f"{MODEL} or {TEXT} not found: this benchmark needs ../shared beside the repo")
    torch.set_num_threads(args.threads)
    settings = [s for s in settings_for(args.group_size) if not args.only or setting_name(*s) in args.only]
    runs: list[dict[str, Any]] = []

    def record(**row: Any) -> None:
        runs.append(row)
        print(json.dumps(row), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        calibration, held_out = split_text(Path(tmp))
        windows = eval_windows(held_out, args.eval_windows)
        float_model = load_model(MODEL, torch.float32, "cpu")
        checkpoint = Checkpoint.open(MODEL)
        first = CalibrationSettings(dataset=str(calibration), num_samples=args.num_samples, seq_len=args.seq_len,
                                    seed=args.seeds[0])
        same_hessian = same_hessian_errors(float_model, windows_for(checkpoint, first).input_ids, gptq, quant,
                                           settings)
        print(json.dumps({"same_hessian": same_hessian}), flush=True)
        for bits, group, act_order in settings:
            name = setting_name(bits, group, act_order)
            if not act_order:  # RTN has no calibration and no act-order: one run per bits x groups
                model, seconds = run_quantkit("zeropoint", bits, group, False, None, Path(tmp) / "rtn")
                record(setting=setting_name(bits, group, False), impl="rtn", seed=None,
                       seconds=seconds, **scores(model, float_model, windows))
            for seed in args.seeds:
                data = CalibrationSettings(dataset=str(calibration), num_samples=args.num_samples,
                                           seq_len=args.seq_len, seed=seed, batch_size=args.batch_size)
                for group_fit in args.group_fit:
                    model, seconds = run_quantkit("gptq", bits, group, act_order, data, Path(tmp) / "q", group_fit)
                    record(setting=name, impl="quantkit" + ("" if group_fit == DEFAULT_GROUP_FIT else f"-{group_fit}"),
                           seed=seed, threads=args.threads, seconds=seconds, **scores(model, float_model, windows))
                if args.thread_check and seed == args.seeds[0]:
                    torch.set_num_threads(args.thread_check)
                    model, seconds = run_quantkit("gptq", bits, group, act_order, data, Path(tmp) / "q")
                    torch.set_num_threads(args.threads)
                    record(setting=name, impl="quantkit", seed=seed, threads=args.thread_check,
                           seconds=seconds, **scores(model, float_model, windows))
                if args.skip_reference:
                    continue
                reference = copy.deepcopy(float_model)
                started = time.perf_counter()
                with cpu_only_reference():
                    reference_sequential(reference, windows_for(checkpoint, data).input_ids, bits, group,
                                         act_order, gptq, quant)
                record(setting=name, impl="reference", seed=seed, threads=args.threads,
                       seconds=time.perf_counter() - started, **scores(reference, float_model, windows))
        float_ppl = evaluate(float_model, windows, batch_size=8).model.ppl
    table = aggregate(runs, args.threads)
    args.results.write_text(json.dumps({
        "model": "stories260K", "calibration": f"tinystories_val.txt first half, {args.num_samples} x "
        f"{args.seq_len} tokens per seed", "evaluation": f"tinystories_val.txt second half, gptq protocol, "
        f"seq-len {EVAL_SEQ_LEN}, {len(windows)} windows", "float_ppl": float_ppl, "seeds": args.seeds,
        "threads": args.threads, "quantkit_batch_size": args.batch_size,
        "reference": reference_commit(args.reference), "same_hessian": same_hessian,
        "summary": table, "runs": runs,
    }, indent=2) + "\n")
    print(f"wrote {args.results}")
    print(markdown_table(table))


def aggregate(runs: list[dict[str, Any]], threads: int) -> dict[str, dict[str, Any]]:
    """Per setting and implementation: mean, min, max, std of ppl and KL over seeds (main thread count only)."""
    table: dict[str, dict[str, Any]] = {}
    for row in runs:
        if row.get("threads", threads) != threads:
            continue
        cell = table.setdefault(row["setting"], {}).setdefault(row["impl"], {"ppl": [], "kl": []})
        cell["ppl"].append(row["ppl"])
        cell["kl"].append(row["kl"])
    for impls in table.values():
        for impl, cell in impls.items():
            impls[impl] = {metric: summary(values) for metric, values in cell.items()}
    return table


def markdown_table(table: dict[str, dict[str, Any]]) -> str:
    """The docs' table: per setting, ppl and KL mean (min-max) of quantkit, the reference and RTN."""
    def cell(stats: dict[str, float] | None, digits: int) -> str:
        if stats is None:
            return "—"
        if stats["min"] == stats["max"]:
            return f"{stats['mean']:.{digits}f}"
        return f"{stats['mean']:.{digits}f} ({stats['min']:.{digits}f}–{stats['max']:.{digits}f})"

    impls = ("quantkit", "quantkit-current", "reference", "rtn")
    lines = ["| setting | " + " | ".join(f"{i} ppl" for i in impls) + " | " + " | ".join(f"{i} KL" for i in impls)
             + " |", "|---" + "|---:" * 2 * len(impls) + "|"]
    for name, row in table.items():
        rtn = table.get(name.removesuffix("-act"), {}).get("rtn")
        stats = {**row, "rtn": rtn}
        lines.append(f"| {name} | " + " | ".join(cell(stats.get(i) and stats[i]["ppl"], 3) for i in impls) + " | "
                     + " | ".join(cell(stats.get(i) and stats[i]["kl"], 4) for i in impls) + " |")
    return "\n".join(lines)


def reference_commit(path: str) -> str | None:
    head = Path(path) / ".git" / "HEAD"
    if not head.is_file():
        return None
    ref = head.read_text().strip()
    if ref.startswith("ref: "):
        target = Path(path) / ".git" / ref[5:]
        return target.read_text().strip() if target.is_file() else ref
    return ref


if __name__ == "__main__":
    main()
