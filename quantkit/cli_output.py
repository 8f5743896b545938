"""What the CLI prints: the two consoles and the tables of inspect, calibrate, eval perplexity and presets."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

console = Console()
err_console = Console(stderr=True)  # errors and progress bars: stdout stays clean for --json


def print_inspection(info: dict[str, Any]) -> None:
    """``quantkit inspect``: the architecture and parameters, then what the recipe would do."""
    facts = Table(title=f"{info['model']}", show_header=False)
    for key, value in info["architecture"].items():
        facts.add_row(key, str(value))
    for key, value in info["params"].items():
        facts.add_row(f"params: {key}", f"{value:,}")
    if info["experts"]:
        cov = info["experts"]
        facts.add_row("experts present", f"{cov['layers_with_experts']} layers x {cov['expected_per_layer']}"
                      f" ({'complete' if cov['complete'] else 'INCOMPLETE'})")
    if info["source_weights"]:
        facts.add_row("source weights", info["source_weights"])
    console.print(facts)
    plan = Table(title=f"recipe {info['recipe']['name']}: what quantize would do")
    for column in ("role / scheme", "tensors", "params", "bits/weight"):
        plan.add_column(column, justify="left" if column == "role / scheme" else "right")
    for key, row in info["plan"].items():
        plan.add_row(key, str(row["tensors"]), f"{row['params']:,}", f"{row['bits_per_weight']:.3f}")
    console.print(plan)
    console.print(f"estimated size {info['estimated_size_mb']:.2f} MiB (from {info['original_size_mb']:.2f} MiB)")


def print_calibration(meta: dict[str, Any]) -> None:
    """``quantkit calibrate``: the data used, time and memory, and tokens per routed expert."""
    table = Table(title=f"calibration: {meta['model']}", show_header=False)
    overlap = " (overlapping: the text is short)" if meta["overlapping_windows"] else ""
    table.add_row("data", f"{meta['dataset']}: {meta['num_samples']} x {meta['seq_len']} tokens{overlap}")
    table.add_row("mode", "all experts (statistics only)" if meta["all_experts"] else "routed, as the model does")
    table.add_row("time / peak memory", f"{meta['seconds']:.1f} s / {meta['peak_rss_mb']:.0f} MiB")
    console.print(table)
    if meta["expert_routed_tokens"]:
        experts = Table(title="tokens per routed expert (gate_up input)")
        flag_column = f"< {meta['min_expert_tokens']}"
        for column in ("site", "experts", "routed min / median / max", "observed min", flag_column):
            experts.add_column(column, justify="left" if column == "site" else "right")
        for site, routed in meta["expert_routed_tokens"].items():
            if not site.endswith("gate_up_proj"):
                continue
            observed = meta["expert_tokens"][site]
            ordered = sorted(routed)
            flagged = sum(1 for t in observed if t < meta["min_expert_tokens"])
            experts.add_row(site.removesuffix(".gate_up_proj"), str(len(routed)),
                            f"{ordered[0]:,} / {ordered[len(ordered) // 2]:,} / {ordered[-1]:,}",
                            f"{min(observed):,}", str(flagged))
        console.print(experts)
    for site, path in meta["plots"].items():
        console.print(f"plot {site}: {path}")


def print_eval(result: dict[str, Any]) -> None:
    """``quantkit eval perplexity``: protocol, data, perplexity and the comparison with the base model."""
    table = Table(title=f"perplexity: {result['model']}", show_header=False)
    stride = f", stride {result['stride']}" if result["stride"] else ""
    table.add_row("protocol", f"{result['protocol']} (seq-len {result['seq_len']}{stride})")
    table.add_row("dataset", result["dataset"])
    table.add_row("loaded", result["loaded"]["model"])
    if result["base"]:
        table.add_row("base loaded", result["loaded"]["base"])
    table.add_row("tokenizer", result["tokenizer"])
    table.add_row("windows / tokens scored", f"{result['windows']} / {result['tokens_scored']:,}")
    table.add_row("perplexity", f"{result['ppl']:.4f}")
    if result["base"]:
        table.add_row("base perplexity", f"{result['base_ppl']:.4f}")
        table.add_row("KL(base || model)", f"{result['kl']:.5f}")
        table.add_row("top-1 agreement", f"{result['top1_agreement']:.4f}")
    table.add_row("speed", f"{result['tokens_per_s']:.0f} tokens/s")
    console.print(table)


def print_preset_rules(name: str, type_rules: list[tuple[str, str]]) -> None:
    """``quantkit presets NAME``: a k-quant preset's llama.cpp tensor-type rules."""
    rules_table = Table(title=f"{name}: llama.cpp tensor-type rules (first match wins)")
    rules_table.add_column("tensors")
    rules_table.add_column("type")
    for tensors, rule in type_rules:
        rules_table.add_row(tensors, rule)
    console.print(rules_table)


def print_presets(recipes: dict[str, Any], descriptions: dict[str, str],
                  kquant_summaries: list[dict[str, str]]) -> None:
    """``quantkit presets``: the named recipes, then the k-quant presets."""
    table = Table(title="presets (use --preset NAME)")
    for column in ("name", "default", "rules", "ignore", "description"):
        table.add_column(column)
    for recipe_name, recipe in recipes.items():
        rules = "\n".join(
            f"{', '.join(r.patterns)} → {recipe.default.with_updates(**r.changes).describe()}" for r in recipe.rules
        )
        table.add_row(recipe_name, recipe.default.describe(), rules or "—", ", ".join(recipe.ignore),
                      descriptions.get(recipe_name, ""))
    console.print(table)
    kquant_table = Table(title="k-quant presets (llama.cpp llama_tensor_get_type)")
    for column in kquant_summaries[0]:
        kquant_table.add_column(column)
    for summary in kquant_summaries:
        kquant_table.add_row(*summary.values())
    console.print(kquant_table)
