"""Text for evaluation and calibration: hub datasets by name (online) or local files (always).

Local sources: a ``.txt``/``.raw`` file (one record per line, newline kept, whitespace-only lines
as ``""`` — exactly the rows of Hugging Face's ``wikitext`` builder, so ``wiki.test.raw``
gives the same text as ``--dataset wikitext2``), a ``.jsonl``/``.json`` file (``--text-field``),
a ``.parquet`` file, or a folder of such files (sorted by name).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from quantkit.errors import QuantkitError

TEXT_SUFFIXES = (".txt", ".raw", ".text")
SUFFIXES = (*TEXT_SUFFIXES, ".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class HubDataset:
    """A named hub dataset and how the published protocol joins its records."""

    path: str
    name: str | None
    split: str
    field: str
    joiner: str
    data_files: dict[str, str] | None = None
    max_records: int | None = None


HUB_DATASETS: dict[str, HubDataset] = {
    "wikitext2": HubDataset("wikitext", "wikitext-2-raw-v1", "test", "text", "\n\n"),
    "ptb": HubDataset("ptb_text_only", "penn_treebank", "test", "sentence", " "),
    # GPTQ's c4 evaluation: the first 1,100 documents of the first validation shard, joined by spaces
    "c4": HubDataset("allenai/c4", None, "validation", "text", " ",
                     {"validation": "en/c4-validation.00000-of-00008.json.gz"}, 1100),
}
LOCAL_JOINER = "\n\n"


@dataclass(frozen=True)
class TextSource:
    """Records of text plus the string the protocol joins them with."""

    name: str
    records: list[str]
    joiner: str

    @property
    def text(self) -> str:
        return self.joiner.join(self.records)


def load_text(dataset: str, text_field: str = "text", split: str | None = None) -> TextSource:
    """Records from a hub dataset name or a local path; one-line errors otherwise."""
    path = Path(dataset).expanduser()
    if path.exists():
        files = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES) if path.is_dir() else [path]
        if not files:
            raise QuantkitError(f"no {'/'.join(SUFFIXES)} files in {path}")
        records = [r for f in files for r in _read_file(f, text_field)]
        if not any(r.strip() for r in records):
            raise QuantkitError(f"no text in {path}")
        return TextSource(str(path), records, LOCAL_JOINER)
    if dataset in HUB_DATASETS:
        return _load_hub(dataset, HUB_DATASETS[dataset], split)
    known = ", ".join(HUB_DATASETS)
    raise QuantkitError(f"dataset {dataset!r} is neither a local file/folder nor one of {known}")


def text_rows(text: str) -> list[str]:
    """Lines with their newline; whitespace-only lines become "" (the wikitext builder's rows)."""
    return [line if line.strip() else "" for line in text.splitlines(keepends=True)]


def _read_file(file: Path, text_field: str) -> list[str]:
    if file.suffix in TEXT_SUFFIXES:
        try:
            return text_rows(file.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise QuantkitError(f"{file} is not UTF-8 text: {exc}") from None
    if file.suffix in (".jsonl", ".json"):
        return _read_jsonl(file, text_field)
    if file.suffix == ".parquet":
        return _read_parquet(file, text_field)
    raise QuantkitError(f"unsupported file type {file.suffix!r} for {file}; use one of {', '.join(SUFFIXES)}")


def _read_jsonl(file: Path, text_field: str) -> list[str]:
    text = file.read_text(encoding="utf-8")
    try:
        if file.suffix == ".json" and text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise QuantkitError(f"invalid JSON in {file}: {exc}") from None
    records = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or text_field not in row:
            raise QuantkitError(f"{file} record {i} has no field {text_field!r} (set --text-field)")
        records.append(str(row[text_field]))
    return records


def _read_parquet(file: Path, text_field: str) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise QuantkitError("reading parquet needs pyarrow: pip install pyarrow") from None
    table = pq.read_table(file)
    if text_field not in table.column_names:
        raise QuantkitError(f"{file} has no column {text_field!r} (set --text-field); columns: {table.column_names}")
    return [str(v) for v in table.column(text_field).to_pylist()]


def _load_hub(alias: str, spec: HubDataset, split: str | None) -> TextSource:
    try:
        import datasets
    except ImportError:
        raise QuantkitError(f"--dataset {alias} needs the `datasets` package; or pass a local file") from None
    try:
        data = datasets.load_dataset(spec.path, spec.name, split=split or spec.split, data_files=spec.data_files)
    except Exception as exc:  # network, offline mode and hub errors come in many types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise QuantkitError(
            f"cannot load dataset {alias!r} from the Hugging Face hub ({first}); offline, pass a local "
            "file or folder instead, e.g. --dataset path/to/wiki.test.raw"
        ) from None
    records = [str(r) for r in data[spec.field]]
    if spec.max_records is not None:
        records = records[: spec.max_records]
    return TextSource(alias, records, spec.joiner)
