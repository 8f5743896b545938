"""Hostile recipe files (case 6 of the hostile-inputs issue): each is a one-line QuantkitError, never a
traceback or a hang, and the schema in quantkit/recipe_schema.py is what docs/recipes.md shows."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quantkit import recipe
from quantkit.errors import QuantkitError
from quantkit.recipe import PRESETS, Recipe, get_preset, load_recipe, recipe_from_dict
from quantkit.recipe_schema import MAX_DEPTH, MAX_NODES, MAX_RECIPE_BYTES, SCHEME_FIELDS, render_reference
from quantkit.schemes import SCHEMES
from tests.test_cli import assert_one_line_error, run

DOCS = Path(__file__).resolve().parents[2] / "docs" / "recipes.md"
START, END = "<!-- recipe-schema:start -->\n", "<!-- recipe-schema:end -->"
HEADER = "version: 1\ndefault: {method: absmax, bits: 4, group_size: 128}\n"
BILLION_LAUGHS = (  # 9 levels of 9 references: 9^9 strings once expanded
    'version: 1\ndefault: {method: absmax}\nname: [&a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"], '
    + ", ".join(f"&a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9))
    + "]\n"
)


def recipe_error(tmp_path: Path, content: str | bytes, suffix: str = ".yaml") -> str:
    """The one-line error of loading ``content`` as a recipe file, without the 'invalid recipe FILE: ' prefix."""
    path = tmp_path / f"recipe{suffix}"
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    with pytest.raises(QuantkitError) as info:
        load_recipe(path)
    message = str(info.value)
    assert len(message.splitlines()) == 1, message
    assert message.startswith(f"invalid recipe {path}: "), message
    return message.removeprefix(f"invalid recipe {path}: ")


# --- the file: size, encoding, anchors, duplicate keys, nesting


def test_billion_laughs_is_refused_at_the_first_anchor(tmp_path: Path) -> None:
    assert len(BILLION_LAUGHS) < 600
    message = recipe_error(tmp_path, BILLION_LAUGHS)
    assert message == "anchors and aliases are not allowed in recipes at line 3, column 8"


def test_an_anchor_without_aliases_is_refused_too(tmp_path: Path) -> None:
    message = recipe_error(tmp_path, "version: 1\ndefault: &d {method: absmax}\n")
    assert message == "anchors and aliases are not allowed in recipes at line 2, column 10"


def test_a_file_over_1_mb_is_refused_by_its_size(tmp_path: Path) -> None:
    content = HEADER + "# padding\n" * (2 * MAX_RECIPE_BYTES // 10)
    assert recipe_error(tmp_path, content) == "larger than the 1 MB (1,000,000 bytes) limit for recipes"


def test_non_utf8_bytes_are_refused(tmp_path: Path) -> None:
    content = HEADER.encode() + b"name: caf\xe9\n"  # Latin-1
    assert recipe_error(tmp_path, content) == f"not UTF-8 text: byte 0xe9 at offset {content.index(0xE9)}"


@pytest.mark.parametrize(
    ("suffix", "content", "expected"),
    [
        (".yaml", "version: 1\ndefault: {method: absmax, bits: 4, bits: 8}\n",
         'duplicate key "bits" at line 2, column 36'),
        (".yaml", HEADER + "version: 1\n", 'duplicate key "version" at line 3, column 1'),
        (".json", '{"version": 1, "default": {"method": "absmax", "bits": 4, "bits": 8}}', 'duplicate key "bits"'),
    ],
)
def test_duplicate_keys_are_refused(tmp_path: Path, suffix: str, content: str, expected: str) -> None:
    assert recipe_error(tmp_path, content, suffix) == expected


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_deep_nesting_is_refused(tmp_path: Path, suffix: str) -> None:
    deep = "[" * 20_000 + "]" * 20_000
    content = f'{{"version": 1, "default": {{"method": "absmax"}}, "name": {deep}}}'
    assert recipe_error(tmp_path, content, suffix).startswith(f"nested deeper than {MAX_DEPTH} levels")


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_the_depth_limit_is_the_same_for_yaml_and_json(tmp_path: Path, suffix: str) -> None:
    """The recipe mapping is level 1, so ``name`` may hold MAX_DEPTH - 1 nested lists, not MAX_DEPTH."""

    def name_nested(levels: int) -> str:
        return f'{{"version": 1, "default": {{"method": "absmax"}}, "name": {"[" * levels + "]" * levels}}}'

    assert recipe_error(tmp_path, name_nested(MAX_DEPTH - 1), suffix).startswith("name must be a string")
    assert recipe_error(tmp_path, name_nested(MAX_DEPTH), suffix).startswith(f"nested deeper than {MAX_DEPTH}")


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_too_many_values_are_refused(tmp_path: Path, suffix: str) -> None:
    """1 MB of ``x,`` is 500,000 YAML scalars, 10 s of pure-Python parsing; the node limit stops it early."""
    for extra, accepted in ((MAX_NODES - 9, True), (MAX_NODES - 8, False)):  # the rest is 3 mappings/lists, 6 scalars
        ignore = json.dumps(["x"] * extra, separators=(",", ":"))
        content = f'{{"version": 1, "default": {{"method": "absmax"}}, "ignore": {ignore}}}'
        if accepted:
            (tmp_path / f"ok{suffix}").write_text(content)
            assert len(load_recipe(tmp_path / f"ok{suffix}").ignore) == extra
        else:
            assert recipe_error(tmp_path, content, suffix).startswith("more than 100,000 keys and values")


@pytest.mark.parametrize(
    ("suffix", "content"),
    [(".yaml", "version: 1\ndefault: [absmax\n"), (".json", '{"version": 1,'), (".yaml", HEADER + "---\n{}\n"),
     (".yaml", "version: 1\nbits: 1" + "0" * 5000 + "\n"), (".json", '{"version": 1' + "0" * 5000 + "}"),
     (".yaml", "version: 1\nname: 2024-13-45\n"), (".yaml", "version: 1\nname: !!python/object:os.system x\n")],
)
def test_unparsable_files_are_one_line_errors(tmp_path: Path, suffix: str, content: str) -> None:
    recipe_error(tmp_path, content, suffix)


def test_an_unreadable_path_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(QuantkitError, match="recipe file not found"):
        load_recipe(tmp_path)


# --- the schema: types, ranges, patterns


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("default: {method: absmax, bits: four}", 'default.bits must be an integer, got "four"'),
        ("default: {method: absmax, bits: 4.5}", "default.bits must be an integer, got 4.5"),
        ("default: {method: absmax, bits: true}", "default.bits must be an integer, got true"),
        ("default: {method: absmax, bits: 12}", "default.bits must be between 2 and 8, got 12"),
        ("default: {method: absmax, group_size: '128'}", 'default.group_size must be an integer or null, got "128"'),
        ("default: {method: absmax, percentile: high}", 'default.percentile must be a number, got "high"'),
        ("default: {method: absmax, percentile: .nan}", "default.percentile must be in (0, 100], got NaN"),
        ("default: {method: gptq, damp: '0.1'}", 'default.damp must be a number, got "0.1"'),
        ("default: {method: kquant, kquant_preset: [Q4_K_M]}",
         'default.kquant_preset must be a string or null, got ["Q4_K_M"]'),
        ("default: {method: gptq, symmetric: 'no'}", 'default.symmetric must be true or false, got "no"'),
        ("default: {method: 4}", "default.method must be a string, got 4"),
        ("default: {method: absmax}\nrules: [{match: '*', bits: four}]",
         'rules[0].bits must be an integer, got "four"'),
        ("default: {method: absmax}\nname: 7", "name must be a string, got 7"),
        ("default: {method: absmax}\nrules: {match: '*'}", 'rules must be a list of mappings, got {"match": "*"}'),
        ("default: {method: absmax}\nignore: lm_head", 'ignore must be a list of patterns, got "lm_head"'),
        ("default: {method: absmax}\nignore: [7]", "ignore[0] must be a pattern string, got 7"),
    ],
)
def test_type_confusion_is_refused(tmp_path: Path, body: str, expected: str) -> None:
    assert recipe_error(tmp_path, f"version: 1\n{body}\n") == expected


@pytest.mark.parametrize("group_size", [-1, 0])
def test_group_size_minus_one_or_zero_is_per_channel(tmp_path: Path, group_size: int) -> None:
    """GPTQ tooling spells "no groups" as group_size -1 (or 0); quantkit reads both as granularity channel."""
    for granularity in ("group", "channel"):
        path = tmp_path / f"{granularity}.yaml"
        path.write_text(f"version: 1\ndefault: {{method: gptq, bits: 4, group_size: {group_size}, "
                        f"granularity: {granularity}}}\n")
        default = load_recipe(path).default
        assert (default.granularity, default.group_size) == ("channel", None)  # type: ignore[attr-defined]


def test_group_size_below_minus_one_hints_at_channel_granularity(tmp_path: Path) -> None:
    message = recipe_error(tmp_path, "version: 1\ndefault: {method: gptq, bits: 4, group_size: -2}\n")
    assert message == "default.group_size must be at least -1, got -2; -1 or 0 means one scale per row"


@pytest.mark.parametrize("version", ["true", "1.0", "'1'", "2", "null"])
def test_version_must_be_the_integer_1(tmp_path: Path, version: str) -> None:
    shown = {"true": "true", "1.0": "1.0", "'1'": '"1"', "2": "2", "null": "null"}[version]
    assert recipe_error(tmp_path, f"version: {version}\ndefault: {{method: absmax}}\n") == (
        f"recipe version must be 1, got {shown}"
    )


@pytest.mark.parametrize(
    ("match", "expected"),
    [
        ("{a: 1}", 'rules[0].match must be a pattern or a non-empty list of patterns, got {"a": 1}'),
        ("[]", "rules[0].match must be a pattern or a non-empty list of patterns, got []"),
        ("[lm_head, 3]", "rules[0].match[1] must be a pattern string, got 3"),
        ("'re:('", 'bad regex "re:(" in rules[0].match: missing ) at position 1'),
        ("[lm_head, 're:a{99999999999}']", 'bad regex "re:a{99999999999}" in rules[0].match[1]: '
                                           "repeat count too big at position 2"),
        ("'role:experts'", "unknown role 'experts' in rules[0].match; roles: embedding, lm_head, norm, router, "
                           "attention, dense_mlp, shared_expert, routed_expert, other"),
    ],
)
def test_bad_match_is_refused(tmp_path: Path, match: str, expected: str) -> None:
    assert recipe_error(tmp_path, f"{HEADER}rules: [{{match: {match}, bits: 8}}]\n") == expected


def test_bad_regex_in_ignore_is_refused(tmp_path: Path) -> None:
    assert recipe_error(tmp_path, f"{HEADER}ignore: [lm_head, 're:(']\n") == (
        'bad regex "re:(" in ignore[1]: missing ) at position 1'
    )


def test_semantic_errors_name_their_place(tmp_path: Path) -> None:
    assert recipe_error(tmp_path, "version: 1\ndefault: {method: absmax, clip: kl}\n") == (
        "default: weight clip must be one of minmax, percentile, mse, got 'kl'"
    )
    assert recipe_error(tmp_path, f"{HEADER}rules: [{{match: '*', method: magic}}]\n").startswith(
        "rules[0]: unknown method 'magic'; supported: absmax"
    )


@pytest.mark.parametrize("patterns", [["re:("], ["lm_head", "role:experts"]])
def test_with_ignore_checks_patterns_like_a_file(patterns: list[str]) -> None:
    with pytest.raises(QuantkitError, match=r"in --ignore"):
        get_preset("int8").with_ignore(patterns)


def test_cli_ignore_with_a_bad_regex_is_a_one_line_error() -> None:
    code, _, err = run("inspect", "--ignore", "re:(")
    assert_one_line_error(code, err, 'bad regex "re:(" in --ignore: missing ) at position 1')


def test_a_backtracking_regex_does_not_hang(tiny_models: dict[str, Path]) -> None:
    """`(.*)*x` made Python's re backtrack for over 20 s on one tensor name; the regex engine answers at once."""
    started = time.perf_counter()
    code, _, err = run("inspect", tiny_models["olmoe"], "--ignore", "re:(.*)*x", "--json")
    assert code == 0, err
    assert time.perf_counter() - started < 30


def test_a_regex_over_its_time_limit_is_a_one_line_error(tiny_models: dict[str, Path],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    class Slow:
        def fullmatch(self, text: str, timeout: float) -> None:
            raise TimeoutError

    monkeypatch.setattr(recipe.regex, "compile", lambda pattern: Slow())
    code, _, err = run("inspect", tiny_models["olmoe"], "--ignore", "re:slow")
    assert_one_line_error(code, err, "pattern 're:slow' takes over 1 s to match", "simplify it")


def test_cli_recipe_with_an_alias_bomb_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "bomb.yaml").write_text(BILLION_LAUGHS)
    code, _, err = run("inspect", "--recipe", tmp_path / "bomb.yaml")
    assert_one_line_error(code, err, "bomb.yaml: anchors and aliases are not allowed in recipes")


# --- what still loads


@pytest.mark.parametrize(
    "content",
    [
        HEADER,
        "\ufeff" + HEADER,  # a UTF-8 byte-order mark
        HEADER + "rules:\nignore:\n",  # empty keys: no rules, nothing ignored
        HEADER + "rules: [{match: '*', group_size: null}]\n",
        "version: 1\ndefault: {method: gptq, bits: 4, percentile: 99, damp: 0.1, symmetric: true}\n",
        "version: 1\ndefault: {method: kquant, kquant_preset: Q4_K_M, ggml_type: null}\n",
        "version: 1\ndefault: {<<: {method: absmax}, bits: 4}\n",  # a merge key without an anchor
    ],
)
def test_valid_recipes_load(tmp_path: Path, content: str) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text(content)
    assert isinstance(load_recipe(path), Recipe)


def test_the_docs_example_loads(tmp_path: Path) -> None:
    example = DOCS.read_text().split("```yaml\n")[1].split("```")[0]
    (tmp_path / "example.yaml").write_text(example)
    recipe = load_recipe(tmp_path / "example.yaml")
    assert (recipe.name, len(recipe.rules), recipe.ignore) == ("w4-moe", 2, ("role:lm_head",))


@pytest.mark.parametrize("name", [*PRESETS, "Q4_K_M"])
def test_presets_round_trip_through_the_schema(name: str) -> None:
    recipe = get_preset(name)
    assert recipe_from_dict(recipe.to_dict(), name=name) == recipe


# --- the schema is the documentation


def test_the_schema_covers_every_setting_of_every_method() -> None:
    settings = set().union(*(SCHEMES.get(method).config_type.settings() for method in SCHEMES))
    names = [spec.name for spec in SCHEME_FIELDS]
    assert names[0] == "method" and len(set(names)) == len(names) and set(names[1:]) == settings


def test_docs_show_the_rendered_schema() -> None:
    text = DOCS.read_text()
    assert text.count(START) == 1 and text.count(END) == 1
    block = text.split(START)[1].split(END)[0]
    assert block == render_reference(), (
        "docs/recipes.md is out of date: paste quantkit.recipe_schema.render_reference() between its markers"
    )


def test_user_guide_links_the_reference() -> None:
    assert "(recipes.md)" in (DOCS.parent / "user-guide.md").read_text()


# --- fuzzing: whatever the input, only QuantkitError escapes, quickly

SCALARS = (
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
    | st.sampled_from(["re:(", "re:.*", "role:router", "role:x", "*", "absmax", "gptq", "kquant", "float",
                       "Q4_K_M", "Q4_K", "group", "channel", "percentile", "static"])
)
KEYS = st.sampled_from(["version", "name", "default", "rules", "ignore", "match", *(f.name for f in SCHEME_FIELDS)])
JSONISH = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS | st.text(max_size=6), inner, max_size=4),
    max_leaves=16,
)
PLAUSIBLE = st.sampled_from([2, 4, 8, 16, 128, 0.5, 99.0, True, False, None, "tensor", "channel", "group", "full",
                             "mse", "percentile", "static", "dynamic", "kl", "Q4_K", "Q4_K_M"])
SCHEMEISH = st.dictionaries(st.sampled_from([f.name for f in SCHEME_FIELDS]), PLAUSIBLE | SCALARS | JSONISH, max_size=4)
RECIPEISH = st.fixed_dictionaries(
    {
        "version": st.just(1),  # wrong versions: test_version_must_be_the_integer_1 and JSONISH
        "default": st.builds(lambda method, rest: {"method": method, **rest}, st.sampled_from(list(SCHEMES)),
                             SCHEMEISH),
    },
    optional={
        "rules": st.lists(st.builds(lambda match, rest: {"match": match, **rest}, SCALARS | JSONISH, SCHEMEISH),
                          max_size=3) | JSONISH,
        "ignore": st.lists(SCALARS, max_size=3) | JSONISH,
        "name": st.text(max_size=8),
    },
)
FUZZ = settings(max_examples=200, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])


def loads_or_refuses(load: Any) -> None:
    """Call ``load``: a Recipe or a one-line QuantkitError, nothing else."""
    try:
        assert isinstance(load(), Recipe)
    except QuantkitError as exc:
        assert len(str(exc).splitlines()) == 1, str(exc)


@FUZZ
@given(content=st.binary(max_size=300) | st.text("{}[]:,-&*!|>'\"#\n\t 01aeu.:\\", max_size=200).map(str.encode),
       suffix=st.sampled_from([".yaml", ".json"]))
def test_fuzz_random_bytes(tmp_path: Path, content: bytes, suffix: str) -> None:
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(content)
    loads_or_refuses(lambda: load_recipe(path))


@FUZZ
@given(data=JSONISH | RECIPEISH)
def test_fuzz_structures(tmp_path: Path, data: Any) -> None:
    loads_or_refuses(lambda: recipe_from_dict(data))
    (tmp_path / "fuzz.json").write_text(json.dumps(data))
    loads_or_refuses(lambda: load_recipe(tmp_path / "fuzz.json"))
    (tmp_path / "fuzz.yaml").write_text(yaml.safe_dump(data))
    loads_or_refuses(lambda: load_recipe(tmp_path / "fuzz.yaml"))
