"""Evaluation: protocol window accounting, perplexity against an independent computation, KL and
agreement against itself, the regression gate's exit codes, and offline errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from quantkit.cli import app
from quantkit.errors import QuantkitError
from quantkit.eval.run import EvalSettings, load_model, run_perplexity
from quantkit.eval.windows import make_windows
from quantkit.model.tokenizer import load_tokenizer
from quantkit.text_sources import load_text, text_rows

runner = CliRunner()


# --- windows -----------------------------------------------------------------------------------------


def test_gptq_windows_drop_the_remainder() -> None:
    ids = torch.arange(1030)
    windows = make_windows(ids, "gptq", 256)
    assert len(windows) == 4  # 1030 // 256; the last 6 tokens are dropped
    assert torch.equal(torch.cat([w.tokens for w in windows]), ids[:1024])
    assert all(w.n_scored == 255 for w in windows)


def test_llamacpp_windows_put_bos_first_and_score_the_second_half() -> None:
    ids = torch.arange(10, 10 + 1100)
    windows = make_windows(ids, "llamacpp", 512, bos_id=1)
    assert len(windows) == 2
    for i, w in enumerate(windows):
        assert int(w.tokens[0]) == 1
        assert torch.equal(w.tokens[1:], ids[i * 512 + 1 : (i + 1) * 512])
        assert w.n_scored == 255  # targets 257..511 (llama-perplexity: first = n_ctx/2, n_ctx-1-first)


def test_sliding_windows_score_every_token_once() -> None:
    ids = torch.arange(1000)
    windows = make_windows(ids, "gptq", 256, stride=100)
    assert sum(w.n_scored for w in windows) == 999  # every token but the first
    assert windows[0].n_scored == 255 and windows[1].n_scored == 100
    assert torch.equal(windows[-1].tokens[-1:], ids[-1:])


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        (dict(protocol="gptq", seq_len=4096), "fewer than one window"),
        (dict(protocol="bogus", seq_len=16), "unknown protocol 'bogus'"),
        (dict(protocol="gptq", seq_len=16, stride=32), "--stride must be between 1 and --seq-len"),
    ],
)
def test_window_errors(kwargs: dict, fragment: str) -> None:
    with pytest.raises(QuantkitError, match=fragment):
        make_windows(torch.arange(100), **kwargs)


def test_text_rows_mirror_the_wikitext_builder() -> None:
    assert text_rows(" \n = Title = \n \nSome text .\n") == ["", " = Title = \n", "", "Some text .\n"]


# --- perplexity ------------------------------------------------------------------------------------


def independent_ppl(model_dir: Path, text_file: Path, protocol: str, seq_len: int) -> float:
    """Straight from the protocol definitions with transformers' own loss, no quantkit windows."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tokenizer("\n\n".join(text_rows(text_file.read_text())), return_tensors="pt").input_ids
    n = ids.shape[1] // seq_len
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(n):
            window = ids[:, i * seq_len : (i + 1) * seq_len].clone()
            if protocol == "gptq":
                nll += float(model(window, labels=window).loss) * (seq_len - 1)
                count += seq_len - 1
            else:
                window[0, 0] = tokenizer.bos_token_id
                log_probs = torch.log_softmax(model(window).logits[0].float(), -1)
                first = seq_len // 2
                for pos in range(first, seq_len - 1):
                    nll -= float(log_probs[pos, window[0, pos + 1]])
                    count += 1
    return math.exp(nll / count)


@pytest.mark.parametrize("protocol", ["gptq", "llamacpp"])
def test_perplexity_equals_an_independent_computation(protocol: str, tiny_lm: Path, test_text: Path) -> None:
    settings = EvalSettings(dataset=str(test_text), protocol=protocol, seq_len=64, batch_size=3)
    result = run_perplexity(tiny_lm, settings)
    assert result["ppl"] == pytest.approx(independent_ppl(tiny_lm, test_text, protocol, 64), rel=1e-5)
    assert result["windows"] == result["text_tokens"] // 64
    assert result["tokens_scored"] == result["windows"] * (63 if protocol == "gptq" else 31)


def test_model_against_itself_has_zero_kl_and_full_agreement(tiny_lm: Path, test_text: Path) -> None:
    settings = EvalSettings(dataset=str(test_text), seq_len=64, max_windows=5)
    result = run_perplexity(tiny_lm, settings, base=tiny_lm)
    assert result["kl"] == pytest.approx(0.0, abs=1e-7)
    assert result["top1_agreement"] == 1.0
    assert result["ppl"] == result["base_ppl"]
    assert result["windows"] == 5


def test_quantized_model_against_base(tiny_lm: Path, test_text: Path, tmp_path: Path) -> None:
    from quantkit.api import QuantizeOptions, quantize
    from quantkit.recipe import get_preset

    out = tmp_path / "q"
    quantize(tiny_lm, get_preset("int4-g128").with_default(group_size=16, bits=3), out,
             options=QuantizeOptions(show_progress=False))
    assert load_tokenizer(out)  # the tokenizer travelled with the weights
    result = run_perplexity(out, EvalSettings(dataset=str(test_text), seq_len=64), base=tiny_lm)
    assert result["kl"] > 0 and result["top1_agreement"] < 1
    assert result["base_ppl"] == pytest.approx(run_perplexity(tiny_lm, EvalSettings(str(test_text), seq_len=64))["ppl"])


def test_batching_does_not_change_the_result(tiny_lm: Path, test_text: Path) -> None:
    one = run_perplexity(tiny_lm, EvalSettings(dataset=str(test_text), seq_len=64, batch_size=1))
    many = run_perplexity(tiny_lm, EvalSettings(dataset=str(test_text), seq_len=64, batch_size=8))
    assert one["ppl"] == pytest.approx(many["ppl"], rel=1e-5)


def test_logits_in_chunks_give_the_full_logits_result(tiny_lm: Path, test_text: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The head runs on LOGIT_CHUNK positions at a time; ppl, KL and agreement equal the whole-window logits'."""
    from quantkit.api import QuantizeOptions, quantize
    from quantkit.eval import perplexity
    from quantkit.recipe import get_preset

    out = tmp_path / "q"
    quantize(tiny_lm, get_preset("int4-g128").with_default(group_size=16, bits=3), out,
             options=QuantizeOptions(show_progress=False))
    settings = EvalSettings(dataset=str(test_text), seq_len=64, max_windows=6)
    chunked = []
    monkeypatch.setattr(perplexity, "LOGIT_CHUNK", 7)  # 63 scored positions: 9 chunks per window
    original = perplexity.scored_log_probs

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        for log_probs, targets in original(*args, **kwargs):
            chunked.append(targets.shape[1])
            yield log_probs, targets

    monkeypatch.setattr(perplexity, "scored_log_probs", counting)
    small = run_perplexity(out, settings, base=tiny_lm)
    assert set(chunked) == {7}
    monkeypatch.setattr(perplexity, "LOGIT_CHUNK", 10**6)
    chunked.clear()
    whole = run_perplexity(out, settings, base=tiny_lm)
    assert set(chunked) == {63}
    for key in ("ppl", "base_ppl", "kl"):
        assert small[key] == pytest.approx(whole[key], rel=1e-6), key
    assert small["top1_agreement"] == whole["top1_agreement"]


def test_loader_matches_transformers_for_a_float_checkpoint(tiny_lm: Path) -> None:
    import transformers

    ours = load_model(tiny_lm, torch.float32, "cpu")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float32).eval()
    ids = torch.arange(20).reshape(1, 20)
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, theirs(ids).logits)


# --- CLI and gate ---------------------------------------------------------------------------------------


def cli(*args: object) -> tuple[int, str, str]:
    result = runner.invoke(app, ["eval", "perplexity", *map(str, args)])
    return result.exit_code, result.stdout, result.stderr


def test_gate_passes_and_fails_with_the_right_exit_codes(tiny_lm: Path, test_text: Path, tmp_path: Path) -> None:
    from quantkit.api import QuantizeOptions, quantize
    from quantkit.recipe import get_preset

    common = ["--dataset", test_text, "--seq-len", 64]
    baseline = tmp_path / "base.json"
    code, _, err = cli(tiny_lm, *common, "--save", baseline)
    assert code == 0, err
    saved = json.loads(baseline.read_text())
    assert saved["protocol"] == "gptq" and saved["gate"]["passed"] is True

    code, _, err = cli(tiny_lm, *common, "--baseline", baseline, "--max-increase", "0%")
    assert code == 0, err  # same model, same numbers

    better = tmp_path / "better.json"  # a baseline 1% better than this model: +1.01% must fail a 0.5% gate
    better.write_text(json.dumps({**saved, "ppl": saved["ppl"] / 1.0101}))
    code, _, err = cli(tiny_lm, *common, "--baseline", better, "--max-increase", "0.5%")
    assert code == 1
    assert err.strip().startswith("regression: perplexity") and len(err.strip().splitlines()) == 1
    code, _, err = cli(tiny_lm, *common, "--baseline", better, "--max-increase", "1.5%")
    assert code == 0, err

    out = tmp_path / "q2"
    quantize(tiny_lm, get_preset("int4-g128").with_default(group_size=16, bits=2), out,
             options=QuantizeOptions(show_progress=False))
    code, _, err = cli(out, *common, "--base", tiny_lm, "--max-kl", "1e-9")
    assert code == 1 and "regression: KL" in err
    code, _, err = cli(out, *common, "--base", tiny_lm, "--max-kl", "1000", "--json")
    assert code == 0, err


def test_baseline_from_other_settings_is_an_error(tiny_lm: Path, test_text: Path, tmp_path: Path) -> None:
    baseline = tmp_path / "base.json"
    assert cli(tiny_lm, "--dataset", test_text, "--seq-len", 64, "--save", baseline)[0] == 0
    code, _, err = cli(tiny_lm, "--dataset", test_text, "--seq-len", 32, "--baseline", baseline, "--max-increase", "2%")
    assert code == 2 and "seq_len=64" in err


def test_offline_hub_dataset_suggests_a_local_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(QuantkitError, match=r"cannot load dataset 'wikitext2'.*pass a local file or folder"):
        load_text("wikitext2")


@pytest.mark.parametrize(
    ("content", "suffix", "field", "fragment"),
    [
        ('{"txt": "a"}\n', ".jsonl", "text", "has no field 'text'"),
        ("", ".txt", "text", "no text in"),
    ],
)
def test_bad_local_data(content: str, suffix: str, field: str, fragment: str, tmp_path: Path) -> None:
    path = tmp_path / f"data{suffix}"
    path.write_text(content)
    with pytest.raises(QuantkitError, match=fragment):
        load_text(str(path), field)


def test_jsonl_and_folder_sources(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"body": "first"}\n{"body": "second"}\n')
    (tmp_path / "b.txt").write_text("third\n")
    source = load_text(str(tmp_path), "body")
    assert source.records == ["first", "second", "third\n"]
