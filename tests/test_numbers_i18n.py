"""Numbers in every MGSM language's own formats: digit groups, decimal marks, LaTeX grouping, signed currency.

Each language is tested with numbers written the way that language writes them (the MGSM questions in
/work/shared/data/mgsm show the conventions: de "80.000" / "1,50", fr-es-ru "80 000" / "1,50", the others
"80,000" / "1.50"); English keeps its old readings (tests/test_evaluators_answers.py is unchanged).
"""

from __future__ import annotations

import re
from decimal import Decimal
from pathlib import Path

import pytest

from evomerge.evaluators.answers import extract_answer, parse_number
from evomerge.evaluators.numbers import NUMBER_FORMATS, normalize_numbers

NBSP, NNBSP, THIN = "\u00a0", "\u202f", "\u2009"
MGSM = Path("/work/shared/data/mgsm")

# (language, model output, answer phrases, expected value)
CASES = [
    # French: space groups (plain, no-break, narrow no-break), decimal comma
    ("fr", "Il a gagné 70 000 $. La réponse est 70 000.", ("La réponse est",), "70000"),
    ("fr", f"La réponse est 70{NBSP}000 $.", ("La réponse est",), "70000"),
    ("fr", f"La réponse est 70{NNBSP}000.", ("La réponse est",), "70000"),
    ("fr", "Le prix monte de 2,5 %, donc 1 250 000 €", (), "1250000"),
    ("fr", "La réponse est 1,50 €.", ("La réponse est",), "1.5"),
    ("fr", "La réponse est -5 $.", ("La réponse est",), "-5"),
    # Russian: same marks as French
    ("ru", f"Ответ — 70{NNBSP}000.", ("Ответ —",), "70000"),
    ("ru", "Он заплатил 80 000 долларов. Ответ — 12,5.", ("Ответ —",), "12.5"),
    ("ru", "Итого 1 234 567,25 рубля", (), "1234567.25"),
    # Spanish: space groups (MGSM) or point groups, decimal comma
    ("es", "La respuesta es 80 000.", ("La respuesta es",), "80000"),
    ("es", "La respuesta es 80.000 dólares.", ("La respuesta es",), "80000"),
    ("es", "La respuesta es 7,50.", ("La respuesta es",), "7.5"),
    # German: point groups, decimal comma; an English decimal point still reads as one
    ("de", "Die Antwort lautet 70.000 US-Dollar.", ("Die Antwort lautet",), "70000"),
    ("de", "Die Antwort lautet 1.234.567,89.", ("Die Antwort lautet",), "1234567.89"),
    ("de", "Ein Pfund kostet 1,50 $, also 300", (), "300"),
    ("de", "Die Antwort ist 8,50.", ("Die Antwort ist",), "8.5"),
    ("de", "Die Antwort ist 1.5", ("Die Antwort ist",), "1.5"),
    ("de", f"Die Antwort lautet 70{NNBSP}000.", ("Die Antwort lautet",), "70000"),
    ("de", "Die Antwort lautet −5 €.", ("Die Antwort lautet",), "-5"),
    # comma-group languages: the English marks, plus no-break / narrow spaces between groups
    ("ja", "答えは80,000ドルです。", ("答えは",), "80000"),
    ("ja", "答えは１，５００です。", ("答えは",), "1500"),  # full-width digits and comma
    ("zh", "答案是 1,500.50。", ("答案是",), "1500.5"),
    ("zh", f"答案是 70{NNBSP}000。", ("答案是",), "70000"),
    ("th", "คำตอบคือ 80,000", ("คำตอบคือ",), "80000"),
    ("sw", "Jibu ni 70,000.", ("Jibu ni",), "70000"),
    ("bn", "উত্তর হল ৭০,০০০।", ("উত্তর হল",), "70000"),  # Bengali digits
    ("te", "సమాధానం 1,500.", ("సమాధానం",), "1500"),
    # Japanese / Chinese myriads: 万 = 10^4, 億 / 亿 = 10^8
    ("ja", "答えは7万ドルです。", ("答えは",), "70000"),
    ("ja", "答えは1万5000円です。", ("答えは",), "15000"),
    ("zh", "答案是 2.5万。", ("答案是",), "25000"),
    ("zh", "答案是 1亿2000万", ("答案是",), "120000000"),
    # English: LaTeX grouping, signed currency, no-break space groups; old readings kept
    ("en", "The answer is $\\boxed{9{,}500}$.", ("The answer is",), "9500"),
    ("en", "So the total is 9\\,500", (), "9500"),
    ("en", "The answer is -$5.", ("The answer is",), "-5"),
    ("en", "He lost -€12.50 overall", (), "-12.5"),
    ("en", f"The answer is 70{NBSP}000.", ("The answer is",), "70000"),
    ("en", "20-$5 leaves 15", (), "15"),  # an operator before a currency sign, not a sign
    ("en", "1, 2, 3", (), "3"),
    ("en", "The answer is 1,000.", ("The answer is",), "1000"),
]


@pytest.mark.parametrize("language,output,phrases,expected", CASES)
def test_answer_in_the_language_own_format(language, output, phrases, expected):
    assert extract_answer(output, phrases, language) == Decimal(expected)


def test_decimal_comma_languages_read_a_comma_as_the_decimal_mark():
    """In de/fr/es/ru "70,000" is seventy, as a reader of those languages takes it; in English it is 70000."""
    for language in ("de", "fr", "es", "ru"):
        assert extract_answer("= 70,000", (), language) == Decimal(70)
    assert extract_answer("= 70,000", (), "en") == Decimal(70000)


def test_plain_space_groups_only_where_the_language_writes_them():
    assert extract_answer("in 2 000 boxes", (), "fr") == Decimal(2000)
    assert extract_answer("in 2 000 boxes", (), "en") == Decimal(0)  # English: two numbers, as before
    assert normalize_numbers("3 apples and 4 pears", "fr") == "3 apples and 4 pears"


@pytest.mark.parametrize("language", sorted(NUMBER_FORMATS))
def test_mgsm_questions_numbers_read_in_their_language(language):
    """MGSM item 3 (the house bought for 80,000 with 50,000 of repairs) in each language's own text."""
    path = MGSM / f"mgsm_{language}.tsv"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    question = path.read_text(encoding="utf-8").splitlines()[2].rsplit("\t", 1)[0]
    from evomerge.evaluators.answers import _to_ascii_digits

    numbers = {Decimal(n) for n in re.findall(r"\d+(?:\.\d+)?", normalize_numbers(_to_ascii_digits(question),
                                                                                  language))}
    assert {Decimal(80000), Decimal(50000)} <= numbers, (language, question)


def test_mgsm_answers_of_a_thousand_or_more_in_native_format():
    """Every gold answer >= 1000 of MGSM, written in each decimal-comma language's format, reads back exactly."""
    golds = [parse_number(line.rsplit("\t", 1)[1]) for line in
             (MGSM / "mgsm_en.tsv").read_text(encoding="utf-8").splitlines() if line.strip()] \
        if (MGSM / "mgsm_en.tsv").is_file() else [Decimal(70000), Decimal(1250)]
    big = [g for g in golds if g >= 1000 and g == g.to_integral_value()]
    assert big
    for gold in big:
        digits = f"{int(gold):,}"
        for language, mark in (("de", "."), ("fr", NNBSP), ("fr", " "), ("ru", NBSP), ("es", " ")):
            text = digits.replace(",", mark)
            assert extract_answer(f"Answer: {text}", (), language) == gold, (language, text)


@pytest.mark.parametrize("language,answer", [
    ("fr", "La réponse est 70 000 $."), ("fr", f"La réponse est 70{NNBSP}000 $."),
    ("ru", f"Ответ — 70{NBSP}000."), ("es", "La respuesta es 70 000."),
    ("de", "Die Antwort lautet 70.000 US-Dollar."), ("ja", "答えは7万ドルです。"),
    ("en", "The answer is $70,000."), ("zh", "答案是 70,000。"),
])
def test_mgsm_evaluator_reads_its_own_languages_answer_to_item_3(language, answer):
    """The built-in mgsm:LANG evaluator scores MGSM item 3 (gold 70000) right when the model writes the amount the
    way that language does."""
    from evomerge.evaluators import build_evaluator
    from evomerge.evaluators.answers import answers_equal

    evaluator = build_evaluator(f"mgsm:{language}")
    gold = evaluator.items[2].answer
    assert gold == Decimal(70000)
    assert answers_equal(evaluator.read_answer(answer), gold)
