"""Answer extraction on tricky outputs, exact comparison, and the offline language gate."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest
import yaml

from evomerge.evaluators import evaluators_dir
from evomerge.evaluators.answers import answers_equal, extract_answer, parse_number
from evomerge.evaluators.language import is_language, language_score

JA_PHRASES = ("答えは", "The answer is")

EXTRACTION_CASES = [
    ("The answer is 7.", ("The answer is",), "7"),  # trailing full stop
    ("So 3 + 4 = 7. The answer is 7", ("The answer is",), "7"),
    ("1,000", (), "1000"),  # thousands separator
    ("They paid $1,234,567 in total.", (), "1234567"),
    ("The answer is -3.", ("The answer is",), "-3"),  # sign
    ("It is -3", (), "-3"),
    ("10-3=7", (), "7"),  # a minus between numbers is an operator, not a sign
    ("The cost is 12.50 dollars.", (), "12.5"),  # decimals, compared exactly
    ("The answer is 18. Next, 20 more.", ("The answer is",), "18"),  # phrase wins over last number
    ("5 apples and 6 pears, so 11", (), "11"),  # last number fallback
    ("the answer is: $42", ("The answer is",), "42"),  # case, colon, currency
    ("答えは11です。", JA_PHRASES, "11"),
    ("ロジャーは最初5個のボールがありました。5+6=11。答えは１１です。", JA_PHRASES, "11"),  # full-width digits
    ("উত্তর হল ১১।", ("উত্তর হল",), "11"),  # Bengali digits
    ("Ответ — 11.", ("Ответ —",), "11"),
    ("1, 2, 3", (), "3"),  # a list, not a thousands number
    ("−5 degrees", (), "-5"),  # Unicode minus sign
    ("no number here", (), None),
    ("", (), None),
]


@pytest.mark.parametrize("output,phrases,expected", EXTRACTION_CASES)
def test_extract_answer_table(output, phrases, expected):
    got = extract_answer(output, phrases)
    assert got == (None if expected is None else Decimal(expected))


def test_exact_equality_rules():
    assert answers_equal(parse_number("12.50"), "12.5")
    assert answers_equal(parse_number("1,000"), 1000)
    assert answers_equal(extract_answer("The answer is 7."), Decimal(7))
    assert not answers_equal(parse_number("7.01"), 7)
    assert not answers_equal(None, 7)
    assert parse_number("abc") is None
    assert parse_number("114,200") == 114200  # an MGSM gold answer with a separator


def test_language_gate_scripts():
    ja = "ロジャーは最初5個のボールがありました。5+6=11。答えは11です。"
    zh = "罗杰一开始有 5 个球。5 + 6 = 11。答案是 11。"
    assert is_language(ja, "ja") and not is_language(ja, "zh")
    assert is_language(zh, "zh") and not is_language(zh, "ja")  # Han without kana is not Japanese
    assert is_language("คำตอบคือ 11", "th")
    assert is_language("Ответ — 11.", "ru")
    assert is_language("উত্তর হল 11।", "bn")
    assert is_language("సమాధానం 11.", "te")
    assert not is_language("The answer is 11.", "ja")
    assert not is_language("42", "en")  # no letters: no language
    assert is_language("The answer is 11.", "en")
    # a mostly-English output with a few Japanese words fails the Japanese gate at 0.5
    mixed = "The answer is 11 答えは"
    assert 0 < language_score(mixed, "ja") < 0.5
    with pytest.raises(ValueError):
        language_score("x", "xx")


def test_language_gate_on_mgsm_exemplars():
    """Every MGSM exemplar answer passes its own language's gate (Latin-script ones only check the script)."""
    data = json.loads((evaluators_dir() / "data/mgsm/exemplars.json").read_text(encoding="utf-8"))
    for lang, exemplars in data["MGSM_EXEMPLARS"].items():
        for ex in exemplars.values():
            assert is_language(ex["a"], lang), (lang, ex["a"])
    assert not is_language(data["MGSM_EXEMPLARS"]["en"]["1"]["a"], "ja")


def test_language_cues_match_the_exemplars():
    """evaluators/languages.yaml cues are verbatim from the exemplars, and the extractor reads their answers."""
    folder = evaluators_dir()
    cues = yaml.safe_load((folder / "languages.yaml").read_text(encoding="utf-8"))
    data = json.loads((folder / "data/mgsm/exemplars.json").read_text(encoding="utf-8"))
    numbers = data["EXEMPLAR_NUMBER_ANSWERS"]
    for lang, exemplars in data["MGSM_EXEMPLARS"].items():
        for key, ex in exemplars.items():
            assert ex["q"].startswith(cues[lang]["question_prefix"])
            assert ex["a"].startswith(cues[lang]["answer_prefix"])
            predicted = extract_answer(ex["a"], tuple(cues[lang]["answer_phrases"]))
            assert predicted == numbers[int(key) - 1], (lang, key, ex["a"])


def test_vendored_data_has_licences():
    folder = Path(evaluators_dir()) / "data"
    for sub in ("mgsm", "gsm8k"):
        assert (folder / sub / "LICENSE").is_file()
    assert (folder / "README.md").is_file()
    assert sum(1 for _ in (folder / "gsm8k/test.jsonl").open()) == 1319
    assert sum(1 for _ in (folder / "mgsm/mgsm_ja.tsv").open(encoding="utf-8")) == 250
