"""Numeric answer extraction from a model's free-text output, and exact comparison with the gold answer.

Rule (the MGSM / evolutionary-merge convention): the number right after an answer phrase ("The answer is",
or the language's own phrase, e.g. "答えは") when one is present, else the last number in the text.
Numbers are read with thousands separators ("1,000" is 1000), signs ("-3") and decimals ("12.50" equals 12.5),
after Unicode normalisation (full-width digits, native-script decimal digits, the Unicode minus sign).
Numbers written in the evaluator's language ("70 000" in French, "70.000" in German, "9{,}500" in LaTeX, "-$5")
are first rewritten in that one form by ``numbers.normalize_numbers``; English text reads as it always did.
Values are compared as exact decimals, so no float rounding decides whether an answer is right.
"""

from __future__ import annotations

import re
import unicodedata
from decimal import Decimal, InvalidOperation
from functools import lru_cache

from evomerge.evaluators.numbers import GROUP_SPACES, normalize_numbers

DEFAULT_ANSWER_PHRASES: tuple[str, ...] = ("The answer is",)

# A number: optional sign (only when not glued to a preceding word or digit, so "10-3" is 10 and 3),
# digits with valid thousands groups ("1,000,000") or plain digits, optional decimals; or ".5".
_UNSIGNED = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+"
_NUMBER = rf"(?:(?<![\w.])[-+])?(?:{_UNSIGNED})"
_NUMBER_RE = re.compile(_NUMBER, re.ASCII)
# What may sit between an answer phrase and its number: spaces, colons, dashes, currency signs, "is"-like glue.
_GAP = r"[\s:：=—–$€£¥₹*]*"


_GROUP_SPACE_RUN = re.compile(f"([{GROUP_SPACES}])")


def _to_ascii_digits(text: str) -> str:
    """NFKC (full-width forms) plus every Unicode decimal digit (Bengali, Thai, ...) mapped to 0-9.

    The no-break / narrow / thin spaces of ``GROUP_SPACES`` are kept as they are (NFKC would turn them into plain
    spaces), since between digits they mark digit groups."""
    parts = _GROUP_SPACE_RUN.split(text)
    text = "".join(part if part and part in GROUP_SPACES else unicodedata.normalize("NFKC", part) for part in parts)
    text = text.replace("\u2212", "-")
    if text.isascii():
        return text
    return "".join(str(unicodedata.decimal(ch)) if ch.isdecimal() else ch for ch in text)


def parse_number(text: str) -> Decimal | None:
    """The exact value of one number string ("1,000" -> 1000, "-3", "12.50" -> 12.50); None if not a number."""
    cleaned = _to_ascii_digits(str(text)).strip().replace(",", "").replace("$", "")
    cleaned = cleaned.rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


@lru_cache(maxsize=64)
def _phrase_regex(phrases: tuple[str, ...]) -> re.Pattern[str]:
    alternatives = "|".join(re.escape(p.strip()) for p in sorted(phrases, key=len, reverse=True) if p.strip())
    return re.compile(rf"(?:{alternatives}){_GAP}([-+]?(?:{_UNSIGNED}))", re.IGNORECASE | re.ASCII)


def extract_answer(output: str, phrases: tuple[str, ...] | list[str] = DEFAULT_ANSWER_PHRASES,
                   language: str | None = "en") -> Decimal | None:
    """The predicted number in ``output``: after the first answer phrase if any, else the last number.

    Args:
        output: the model's text.
        phrases: answer phrases ("The answer is"); the number right after the first one found wins.
        language: the evaluator's language; its digit-group and decimal marks are read (see ``numbers``).
    Returns:
        The exact value, or None when the text holds no number.
    """
    text = normalize_numbers(_to_ascii_digits(output), language)
    phrases = tuple(phrases)
    if phrases:
        match = _phrase_regex(phrases).search(text)
        if match:
            return parse_number(match.group(1))
    numbers = _NUMBER_RE.findall(text)
    return parse_number(numbers[-1]) if numbers else None


def answers_equal(predicted: Decimal | None, gold: Decimal | str | int | float | None) -> bool:
    """Exact decimal equality (12.50 == 12.5); a missing prediction is never right."""
    if predicted is None or gold is None:
        return False
    gold_value = gold if isinstance(gold, Decimal) else parse_number(str(gold))
    return gold_value is not None and predicted == gold_value
