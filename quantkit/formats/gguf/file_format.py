"""``--format gguf``: one llama.cpp GGUF file at ``--out`` (k-quants, ternary, float weights), its report beside it."""

from __future__ import annotations

from pathlib import Path

from quantkit.errors import QuantkitError
from quantkit.formats.gguf.layout import GgufLayout
from quantkit.formats.gguf.ternary import check_ternary
from quantkit.formats.output import OUTPUT_FORMATS, FileFormat, refuse_integer_schemes
from quantkit.plan import QuantPlan
from quantkit.schemes import IntConfig, TernaryConfig

MAGIC = b"GGUF"


class GgufFormat(FileFormat):
    """A llama.cpp GGUF file; its report is ``NAME.quantkit_report.json`` beside ``NAME.gguf``."""

    name = "gguf"

    def check(self, plan: QuantPlan) -> None:
        if not check_ternary(plan):
            refuse_integer_schemes(plan, self.name)
            return
        for item in plan.tensors:
            if isinstance(item.scheme, IntConfig) and not isinstance(item.scheme, TernaryConfig):
                raise QuantkitError(f"--format {self.name} holds k-quant, ternary and float weights only; "
                                    f"{item.name} is {item.scheme.describe()}")

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
