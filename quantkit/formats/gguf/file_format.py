"""``--format gguf``: one llama.cpp GGUF file at ``--out`` (k-quants, ternary, float weights), its report beside it."""

from __future__ import annotations

from pathlib import Path

from quantkit.formats.clients import LLAMA_CPP, QUANTKIT_LOADER, ClientNote
from quantkit.formats.gguf.layout import GgufLayout
from quantkit.formats.gguf.ternary import check_ternary, has_ternary
from quantkit.formats.output import OUTPUT_FORMATS, FileFormat, refuse_integer_schemes
from quantkit.plan import QuantPlan

MAGIC = b"GGUF"


class GgufFormat(FileFormat):
    """A llama.cpp GGUF file; its report is ``NAME.quantkit_report.json`` beside ``NAME.gguf``."""

    name = "gguf"

    def check(self, plan: QuantPlan) -> None:
        if has_ternary(plan):
            check_ternary(plan, self.name)
        else:
            refuse_integer_schemes(plan, self.name)

    def clients(self, plan: QuantPlan) -> list[ClientNote]:
        """llama.cpp runs quantkit's GGUF files; DeepSeek-V2's grouped routing is its known difference."""
        grouped_routing = plan.checkpoint.config.get("topk_method") == "group_limited_greedy"
        why = "routes group_limited_greedy differently (sum of the top two per group)" if grouped_routing else None
        return [ClientNote(QUANTKIT_LOADER, True), ClientNote(LLAMA_CPP, True, why)]

    def layout(self, plan: QuantPlan) -> GgufLayout:
        return GgufLayout(plan)

    def report_path(self, out: Path) -> Path:
        return out.with_name(out.stem + ".quantkit_report.json")

    def is_previous(self, path: Path) -> bool:
        """A GGUF file quantkit wrote: GGUF magic, and its report beside it."""
        with path.open("rb") as handle:
            magic = handle.read(len(MAGIC))
        return magic == MAGIC and self.report_path(path).is_file()


OUTPUT_FORMATS.add(GgufFormat.name, GgufFormat())
