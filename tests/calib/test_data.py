"""Calibration data: the bundled default text, seeded window sampling, local sources, errors, and the
hub recipes in calibration_data/recipes (resolved, never downloaded)."""

from __future__ import annotations

import itertools
import re
import sys
import sysconfig
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import quantkit.text_sources as text_sources
from quantkit.calib.data import CalibrationSet, calibration_windows
from quantkit.errors import QuantkitError
from quantkit.text_sources import (
    RECIPE_FIELDS,
    TextSource,
    calibration_data_dir,
    hub_datasets,
    load_text,
    resolve_hub_dataset,
)

REPO_DATA = Path(__file__).resolve().parents[2] / "calibration_data"


class WordIds:
    """A tokenizer for ``"w0 w1 w2 ..."``: word ``wK`` is token K, so a window shows where it was cut."""

    def __call__(self, text: str, verbose: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [int(word[1:]) for word in text.split()]}


def words(tmp_path: Path, n: int, name: str = "words.txt") -> Path:
    path = tmp_path / name
    path.write_text(" ".join(f"w{i}" for i in range(n)) + "\n")
    return path


def window_starts(calib: CalibrationSet) -> list[int]:
    """Each window's position in the token stream, checking it is a contiguous slice of it."""
    seq_len = calib.input_ids.shape[1]
    for row in calib.input_ids:
        assert torch.equal(row, torch.arange(int(row[0]), int(row[0]) + seq_len))
    return [int(row[0]) for row in calib.input_ids]


@pytest.fixture
def tokenizer(tiny_lm: Path) -> Any:
    import transformers

    return transformers.AutoTokenizer.from_pretrained(tiny_lm)


# --- the bundled default -------------------------------------------------------------------------------


def test_bundled_default_yields_windows(tokenizer: Any) -> None:
    calib = calibration_windows(None, tokenizer, num_samples=16, seq_len=64)
    assert calib.input_ids.shape == (16, 64) and calib.input_ids.dtype == torch.int64
    assert calib.source == "bundled default" and calib.seed == 0
    assert calib.text_tokens > 16 * 64 and not calib.overlapping
    assert int(calib.input_ids.max()) < len(tokenizer)


def test_same_seed_same_windows_other_seed_other_windows(tokenizer: Any) -> None:
    first = calibration_windows(None, tokenizer, 8, 32, seed=7)
    again = calibration_windows(None, tokenizer, 8, 32, seed=7)
    other = calibration_windows(None, tokenizer, 8, 32, seed=8)
    assert torch.equal(first.input_ids, again.input_ids)
    assert not torch.equal(first.input_ids, other.input_ids)


def test_bundled_text_is_varied() -> None:
    files = sorted((REPO_DATA / "default").glob("*.txt"))
    assert 15 <= len(files) <= 25
    assert 80_000 <= sum(f.stat().st_size for f in files) <= 150_000
    text = "\n".join(f.read_text(encoding="utf-8") for f in files)
    scripts = {
        "Han": r"[\u4e00-\u9fff]", "Hiragana": r"[\u3040-\u309f]", "Hangul": r"[\uac00-\ud7af]",
        "Cyrillic": r"[\u0400-\u04ff]", "Arabic": r"[\u0600-\u06ff]", "Devanagari": r"[\u0900-\u097f]",
        "Latin accents": r"[éèàçñãõäöüß]",
    }
    for script, pattern in scripts.items():
        assert len(re.findall(pattern, text)) >= 50, script
    for code in ("def main(", "#include <stdio.h>", "fn main()", "SELECT ", "<!DOCTYPE html>", "#!/usr/bin/env bash",
                 "=> {", "|---|"):
        assert code in text, code


def test_calibration_reads_a_text_file_whole_eval_by_rows(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("def f():\n    return 1\n")
    assert load_text(str(tmp_path / "a.txt")).records == ["def f():\n", "    return 1\n"]
    assert load_text(str(tmp_path / "a.txt"), purpose="calibration").records == ["def f():\n    return 1\n"]


# --- sampling ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_windows_are_disjoint_slices_when_the_text_suffices(tmp_path: Path, seed: int) -> None:
    calib = calibration_windows(str(words(tmp_path, 1000)), WordIds(), num_samples=10, seq_len=50, seed=seed)
    starts = sorted(window_starts(calib))
    assert not calib.overlapping and calib.text_tokens == 1000
    assert all(b >= a + 50 for a, b in itertools.pairwise(starts))
    assert starts[0] >= 0 and starts[-1] + 50 <= 1000


def test_windows_spread_over_the_text(tmp_path: Path) -> None:
    path = words(tmp_path, 1000)
    starts = [window_starts(calibration_windows(str(path), WordIds(), 4, 50, seed=s)) for s in range(40)]
    assert len({tuple(sorted(s)) for s in starts}) == 40
    assert min(min(s) for s in starts) < 100 and max(max(s) for s in starts) > 850
    assert any(s != sorted(s) for s in starts)  # windows come in random order, not text order


def test_exact_fit_tiles_the_whole_text(tmp_path: Path) -> None:
    calib = calibration_windows(str(words(tmp_path, 200)), WordIds(), num_samples=4, seq_len=50, seed=3)
    assert sorted(window_starts(calib)) == [0, 50, 100, 150] and not calib.overlapping


def test_short_text_gives_overlapping_windows(tmp_path: Path) -> None:
    calib = calibration_windows(str(words(tmp_path, 100)), WordIds(), num_samples=10, seq_len=20, seed=1)
    starts = window_starts(calib)
    assert calib.overlapping and calib.input_ids.shape == (10, 20)
    assert all(0 <= s <= 80 for s in starts)
    again = calibration_windows(str(words(tmp_path, 100)), WordIds(), num_samples=10, seq_len=20, seed=1)
    assert torch.equal(calib.input_ids, again.input_ids)


# --- local sources -------------------------------------------------------------------------------------


def test_jsonl_with_text_field(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text('{"body": "w0 w1 w2", "id": 1}\n{"body": "w3 w4 w5", "id": 2}\n')
    calib = calibration_windows(str(path), WordIds(), num_samples=2, seq_len=3, text_field="body")
    assert sorted(window_starts(calib)) == [0, 3] and calib.source == str(path)
    with pytest.raises(QuantkitError, match="has no field 'text'"):
        calibration_windows(str(path), WordIds(), num_samples=2, seq_len=3)


def test_parquet_with_text_field(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["w0 w1 w2 w3", "w4 w5 w6 w7"]}), tmp_path / "data.parquet")
    calib = calibration_windows(str(tmp_path / "data.parquet"), WordIds(), 2, 4, text_field="content")
    assert sorted(window_starts(calib)) == [0, 4]


def test_folder_input(tmp_path: Path) -> None:
    words(tmp_path, 30, "a.txt")
    (tmp_path / "b.jsonl").write_text('{"text": "w30 w31 w32 w33 w34 w35 w36 w37 w38 w39"}\n')
    (tmp_path / "notes.md").write_text("w99 is not read: .md is not a text suffix\n")
    calib = calibration_windows(str(tmp_path), WordIds(), num_samples=4, seq_len=10, seed=2)
    assert calib.text_tokens == 40 and sorted(window_starts(calib)) == [0, 10, 20, 30]


# --- errors --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_samples", "seq_len", "n_words", "message"),
    [
        (0, 8, 100, "--num-samples must be at least 1, got 0"),
        (4, 1, 100, "--seq-len must be at least 2, got 1"),
        (4, 10, 5, "calibration text has 5 tokens, fewer than --seq-len 10; lower --seq-len or add text"),
    ],
)
def test_bad_sizes(tmp_path: Path, num_samples: int, seq_len: int, n_words: int, message: str) -> None:
    with pytest.raises(QuantkitError, match=re.escape(message)):
        calibration_windows(str(words(tmp_path, n_words)), WordIds(), num_samples, seq_len)


@pytest.mark.parametrize("content", ["", " \n\n  \n"])
def test_empty_file(tmp_path: Path, content: str) -> None:
    (tmp_path / "empty.txt").write_text(content)
    with pytest.raises(QuantkitError, match="no text in"):
        calibration_windows(str(tmp_path / "empty.txt"), WordIds(), 1, 2)


def test_empty_hub_text(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("quantkit.calib.data.load_text", lambda *a, **k: TextSource("wikitext2", ["", ""], " "))
    with pytest.raises(QuantkitError, match="no calibration text in wikitext2"):
        calibration_windows("wikitext2", WordIds(), 1, 2)


def test_unknown_dataset(tmp_path: Path) -> None:
    with pytest.raises(QuantkitError, match=r"neither a local file/folder nor one of .*wikitext2"):
        calibration_windows(str(tmp_path / "missing.txt"), WordIds(), 1, 2)


def test_messages_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(QuantkitError) as info:
        calibration_windows(str(words(tmp_path, 3)), WordIds(), 1, 10)
    assert "\n" not in str(info.value)


# --- recipes -------------------------------------------------------------------------------------------


def test_recipes_parse_and_name_every_field() -> None:
    recipes = hub_datasets()
    assert {"wikitext2", "c4", "ptb", "pile-val"} <= recipes.keys()
    for file in sorted((REPO_DATA / "recipes").glob("*.yaml")):
        raw = yaml.safe_load(file.read_text())
        assert raw.keys() >= RECIPE_FIELDS, file.name
        assert recipes[file.stem].description


def test_eval_and_calibration_resolve_to_their_splits() -> None:
    assert resolve_hub_dataset("wikitext2", "eval").split == "test"
    calib = resolve_hub_dataset("wikitext2", "calibration")
    assert (calib.dataset, calib.config, calib.split, calib.field, calib.joiner) == (
        "wikitext", "wikitext-2-raw-v1", "train", "text", "\n\n")
    ptb = resolve_hub_dataset("ptb")
    assert (ptb.dataset, ptb.config, ptb.split, ptb.field, ptb.joiner) == (
        "ptb_text_only", "penn_treebank", "test", "sentence", " ")
    assert resolve_hub_dataset("ptb", "calibration").split == "train"


def test_c4_fetches_one_shard_per_purpose() -> None:
    c4_eval = resolve_hub_dataset("c4", "eval")
    assert (c4_eval.dataset, c4_eval.config, c4_eval.split, c4_eval.joiner, c4_eval.max_records) == (
        "allenai/c4", None, "validation", " ", 1100)
    assert c4_eval.data_files == {"validation": "en/c4-validation.00000-of-00008.json.gz"}
    c4_calib = resolve_hub_dataset("c4", "calibration")
    assert c4_calib.split == "train" and c4_calib.data_files == {"train": "en/c4-train.00000-of-01024.json.gz"}
    with pytest.raises(QuantkitError, match="no data file for split 'test'"):
        resolve_hub_dataset("c4", "eval", split="test")


def test_pile_val_is_calibration_only() -> None:
    request = resolve_hub_dataset("pile-val", "calibration")
    assert (request.dataset, request.split, request.field) == ("mit-han-lab/pile-val-backup", "validation", "text")
    with pytest.raises(QuantkitError, match="calibration only"):
        resolve_hub_dataset("pile-val", "eval")
    assert resolve_hub_dataset("pile-val", "eval", split="validation").split == "validation"


@pytest.fixture
def recipe_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A calibration_data folder whose recipes a test writes; hub_datasets' cache is cleared around it."""
    (tmp_path / "recipes").mkdir()
    monkeypatch.setattr(text_sources, "calibration_data_dir", lambda: tmp_path)
    hub_datasets.cache_clear()
    yield tmp_path / "recipes"
    hub_datasets.cache_clear()


GOOD = {"dataset": "a/b", "config": None, "calibration_split": "train", "eval_split": "test", "field": "text",
        "joiner": " ", "description": "a set"}


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"field": None}, "'field' must be a non-empty string"),
        ({"joiner": 3}, "'joiner' must be a string"),
        ({"eval_split": ""}, "'eval_split' must be a non-empty string or null"),
        ({"spilt": "x"}, "unknown field(s): spilt"),
        ({"data_files": ["x"]}, "'data_files' must map split names to file paths"),
        ({"max_records": {"train": 5}}, "'max_records' must map eval and/or calibration"),
        ({"max_records": {"eval": 0}}, "'max_records' counts must be positive integers"),
    ],
)
def test_invalid_recipes(recipe_dir: Path, change: dict[str, Any], fragment: str) -> None:
    (recipe_dir / "bad.yaml").write_text(yaml.safe_dump({**GOOD, **change}))
    with pytest.raises(QuantkitError, match=rf"invalid dataset recipe .*bad\.yaml: {re.escape(fragment)}"):
        hub_datasets()


def test_missing_recipe_field_and_bad_yaml(recipe_dir: Path) -> None:
    (recipe_dir / "bad.yaml").write_text(yaml.safe_dump({k: v for k, v in GOOD.items() if k != "dataset"}))
    with pytest.raises(QuantkitError, match=r"missing field\(s\): dataset"):
        hub_datasets()
    hub_datasets.cache_clear()
    (recipe_dir / "bad.yaml").write_text("dataset: [unclosed\n")
    with pytest.raises(QuantkitError, match=r"invalid dataset recipe .*bad\.yaml") as info:
        hub_datasets()
    assert "\n" not in str(info.value)


def test_a_new_recipe_is_a_new_name(recipe_dir: Path, tmp_path: Path) -> None:
    (recipe_dir / "mine.yaml").write_text(yaml.safe_dump({**GOOD, "max_records": {"calibration": 10}}))
    assert resolve_hub_dataset("mine", "calibration").max_records == 10
    assert resolve_hub_dataset("mine", "eval").max_records is None
    with pytest.raises(QuantkitError, match=r"nor one of mine$"):
        load_text(str(tmp_path / "nothing-here"))


# --- locating calibration_data -------------------------------------------------------------------------


def test_calibration_data_dir_prefers_the_source_tree() -> None:
    assert calibration_data_dir() == REPO_DATA


def test_calibration_data_dir_falls_back_to_the_install_prefix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(text_sources, "__file__", str(tmp_path / "site-packages" / "quantkit" / "text_sources.py"))
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "prefix"))
    monkeypatch.setattr(sysconfig, "get_path", lambda name: str(tmp_path / "prefix"))
    monkeypatch.setattr("site.USER_BASE", None)
    with pytest.raises(QuantkitError, match=r"calibration_data is missing .*; reinstall quantkit"):
        calibration_data_dir()
    installed = tmp_path / "prefix" / "share" / "quantkit" / "calibration_data"
    (installed / "recipes").mkdir(parents=True)
    assert calibration_data_dir() == installed
