"""Text for evaluation and calibration: hub datasets by name (online) or local files (always).

Hub names are the recipe files in ``calibration_data/recipes/`` (the single source of truth): each
names a dataset, config, field, joiner and the split (and optional data files and record limit)
used for each purpose, ``eval`` or ``calibration``.

Local sources: a ``.txt``/``.raw`` file, a ``.jsonl``/``.json`` file (``--text-field``), a
``.parquet`` file, or a folder of such files (sorted by name). For evaluation a text file is one
record per line (newline kept, whitespace-only lines as ``""`` — exactly the rows of Hugging Face's
``wikitext`` builder, so ``wiki.test.raw`` gives the same text as ``--dataset wikitext2``); for
calibration a text file is one record, its whole text, so code and dialogue keep their layout.
"""

from __future__ import annotations

import functools
import json
import site
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from quantkit.errors import QuantkitError

Purpose = Literal["eval", "calibration"]
PURPOSES: tuple[Purpose, ...] = ("eval", "calibration")
TEXT_SUFFIXES = (".txt", ".raw", ".text")
DATA_FILE_SUFFIXES = (*TEXT_SUFFIXES, ".jsonl", ".json", ".parquet")
LOCAL_JOINER = "\n\n"
DATA_DIR_NAME = "calibration_data"
RECIPE_FIELDS = {"dataset", "config", "calibration_split", "eval_split", "field", "joiner", "description"}
OPTIONAL_RECIPE_FIELDS = {"data_files", "max_records"}


def calibration_data_dir() -> Path:
    """``calibration_data/``: the source tree's (clone, editable install), else the installed data files."""
    source_tree = Path(__file__).resolve().parents[1] / DATA_DIR_NAME
    prefixes = [base for base in (sys.prefix, sysconfig.get_path("data"), site.USER_BASE) if base]
    installed = [Path(base) / "share" / "quantkit" / DATA_DIR_NAME for base in prefixes]
    candidates = list(dict.fromkeys([source_tree, *installed]))
    for candidate in candidates:
        if (candidate / "recipes").is_dir():
            return candidate
    raise QuantkitError(f"quantkit's calibration_data is missing (looked in {', '.join(map(str, candidates))}); "
                        "reinstall quantkit")


@dataclass(frozen=True)
class HubDataset:
    """A calibration_data recipe: a hub dataset and how each purpose reads it."""

    name: str
    dataset: str
    config: str | None
    calibration_split: str
    eval_split: str | None
    field: str
    joiner: str
    description: str
    data_files: dict[str, str] | None = None  # split -> file in the dataset repository
    max_records: dict[str, int] | None = None  # purpose -> records kept (the first ones)


@dataclass(frozen=True)
class HubRequest:
    """What ``datasets.load_dataset`` is asked for, resolved from a recipe for one purpose."""

    name: str
    dataset: str
    config: str | None
    split: str
    data_files: dict[str, str] | None
    field: str
    joiner: str
    max_records: int | None


@functools.cache
def hub_datasets() -> dict[str, HubDataset]:
    """Recipe name -> recipe, from ``calibration_data/recipes/*.yaml``."""
    files = sorted((calibration_data_dir() / "recipes").glob("*.yaml"))
    return {file.stem: _parse_recipe(file) for file in files}


def resolve_hub_dataset(name: str, purpose: Purpose = "eval", split: str | None = None) -> HubRequest:
    """The split, data files and record limit recipe ``name`` uses for ``purpose`` (``split`` overrides)."""
    recipes = hub_datasets()
    if name not in recipes:
        raise QuantkitError(f"unknown hub dataset {name!r}; known: {', '.join(recipes)}")
    recipe = recipes[name]
    chosen = split or (recipe.calibration_split if purpose == "calibration" else recipe.eval_split)
    if chosen is None:
        raise QuantkitError(
            f"dataset {name!r} is for calibration only (no eval split); pass --split or another dataset")
    data_files = None
    if recipe.data_files is not None:
        if chosen not in recipe.data_files:
            raise QuantkitError(f"dataset {name!r} has no data file for split {chosen!r}; "
                                f"splits: {', '.join(recipe.data_files)}")
        data_files = {chosen: recipe.data_files[chosen]}
    max_records = (recipe.max_records or {}).get(purpose)
    return HubRequest(name, recipe.dataset, recipe.config, chosen, data_files, recipe.field, recipe.joiner, max_records)


@dataclass(frozen=True)
class TextSource:
    """Records of text plus the string the protocol joins them with."""

    name: str
    records: list[str]
    joiner: str

    @property
    def text(self) -> str:
        return self.joiner.join(self.records)


def load_text(dataset: str, text_field: str = "text", split: str | None = None,
              purpose: Purpose = "eval") -> TextSource:
    """Records from a hub dataset name or a local path, read for ``purpose``; one-line errors otherwise."""
    path = Path(dataset).expanduser()
    if path.exists():
        files = sorted(p for p in path.rglob("*") if p.suffix in DATA_FILE_SUFFIXES) if path.is_dir() else [path]
        if not files:
            raise QuantkitError(f"no {'/'.join(DATA_FILE_SUFFIXES)} files in {path}")
        records = [r for f in files for r in _read_file(f, text_field, purpose)]
        if not any(r.strip() for r in records):
            raise QuantkitError(f"no text in {path}")
        return TextSource(str(path), records, LOCAL_JOINER)
    recipes = hub_datasets()
    if dataset in recipes:
        return _load_hub(resolve_hub_dataset(dataset, purpose, split))
    raise QuantkitError(f"dataset {dataset!r} is neither a local file/folder nor one of {', '.join(recipes)}")


def text_rows(text: str) -> list[str]:
    """Lines with their newline; whitespace-only lines become "" (the wikitext builder's rows)."""
    return [line if line.strip() else "" for line in text.splitlines(keepends=True)]


def _read_file(file: Path, text_field: str, purpose: Purpose) -> list[str]:
    if file.suffix in TEXT_SUFFIXES:
        try:
            text = file.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise QuantkitError(f"{file} is not UTF-8 text: {exc}") from None
        return [text] if purpose == "calibration" else text_rows(text)
    if file.suffix in (".jsonl", ".json"):
        return _read_jsonl(file, text_field)
    if file.suffix == ".parquet":
        return _read_parquet(file, text_field)
    raise QuantkitError(f"unsupported file type {file.suffix!r} for {file}; use one of {', '.join(DATA_FILE_SUFFIXES)}")


def _read_jsonl(file: Path, text_field: str) -> list[str]:
    try:
        text = file.read_bytes().decode("utf-8")
        if file.suffix == ".json" and text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except UnicodeDecodeError as exc:
        raise QuantkitError(f"{file} is not UTF-8 text: {exc}") from None
    except (json.JSONDecodeError, RecursionError) as exc:
        raise QuantkitError(f"invalid JSON in {file}: {exc}") from None
    records = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or text_field not in row:
            raise QuantkitError(f"{file} record {i} has no field {text_field!r} (set --text-field)")
        records.append(str(row[text_field]))
    return records


def _read_parquet(file: Path, text_field: str) -> list[str]:
    try:
        import pyarrow.parquet as pq  # deferred: heavy, needed only for parquet files / hub datasets
    except ImportError:
        raise QuantkitError("reading parquet needs pyarrow: pip install pyarrow") from None
    import pyarrow as pa  # deferred: heavy, needed only for parquet files / hub datasets

    try:
        table = pq.read_table(file)
    except (pa.ArrowException, OSError) as exc:
        raise QuantkitError(f"{file} is not a readable parquet file: {str(exc).strip().splitlines()[0]}") from None
    if text_field not in table.column_names:
        raise QuantkitError(f"{file} has no column {text_field!r} (set --text-field); columns: {table.column_names}")
    return [str(v) for v in table.column(text_field).to_pylist()]


def _load_hub(request: HubRequest) -> TextSource:
    try:
        import datasets  # deferred: heavy, needed only for parquet files / hub datasets
    except ImportError:
        raise QuantkitError(f"--dataset {request.name} needs the `datasets` package; or pass a local file") from None
    try:
        data = datasets.load_dataset(request.dataset, request.config, split=request.split,
                                     data_files=request.data_files)
    except Exception as exc:  # network, offline mode and hub errors come in many types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise QuantkitError(
            f"cannot load dataset {request.name!r} from the Hugging Face hub ({first}); offline, pass a local "
            "file or folder instead, e.g. --dataset path/to/wiki.test.raw"
        ) from None
    records = [str(r) for r in data[request.field]]
    if request.max_records is not None:
        records = records[: request.max_records]
    return TextSource(request.name, records, request.joiner)


def _parse_recipe(file: Path) -> HubDataset:
    try:
        raw: Any = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise QuantkitError(f"invalid dataset recipe {file}: {first}") from None
    try:
        return _recipe_from_mapping(file.stem, raw)
    except QuantkitError as exc:
        raise QuantkitError(f"invalid dataset recipe {file}: {exc}") from None


def _recipe_from_mapping(name: str, raw: Any) -> HubDataset:
    if not isinstance(raw, dict):
        raise QuantkitError(f"a dataset recipe is a mapping with {', '.join(sorted(RECIPE_FIELDS))}")
    missing = RECIPE_FIELDS - raw.keys()
    if missing:
        raise QuantkitError(f"missing field(s): {', '.join(sorted(missing))}")
    unknown = raw.keys() - RECIPE_FIELDS - OPTIONAL_RECIPE_FIELDS
    if unknown:
        raise QuantkitError(f"unknown field(s): {', '.join(sorted(map(str, unknown)))}")
    for key in ("dataset", "calibration_split", "field", "description"):
        if not isinstance(raw[key], str) or not raw[key]:
            raise QuantkitError(f"'{key}' must be a non-empty string")
    for key in ("config", "eval_split"):
        if raw[key] is not None and (not isinstance(raw[key], str) or not raw[key]):
            raise QuantkitError(f"'{key}' must be a non-empty string or null")
    if not isinstance(raw["joiner"], str):
        raise QuantkitError("'joiner' must be a string (quote it, e.g. \"\\n\\n\")")
    data_files = raw.get("data_files")
    if data_files is not None and (not isinstance(data_files, dict) or not data_files or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in data_files.items())):
        raise QuantkitError("'data_files' must map split names to file paths")
    max_records = raw.get("max_records")
    if max_records is not None:
        if not isinstance(max_records, dict) or not max_records or not set(max_records) <= set(PURPOSES):
            raise QuantkitError(f"'max_records' must map {' and/or '.join(PURPOSES)} to a record count")
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in max_records.values()):
            raise QuantkitError("'max_records' counts must be positive integers")
    return HubDataset(name, raw["dataset"], raw["config"], raw["calibration_split"], raw["eval_split"], raw["field"],
                      raw["joiner"], raw["description"].strip(), data_files, max_records)
