"""Numeric answer extraction from a model's free-text output, and exact comparison with the gold answer.

Rule (the MGSM / evolutionary-merge convention): the number right after an answer phrase ("The answer is",
or the language's own phrase, e.g. "答えは") when one is present, else the last number in the text.
Numbers are read with thousands separators ("1,000" is 1000), signs ("-3") and decimals ("12.50" equals 12.5),
after Unicode normalisation (full-width digits, native-script decimal digits, the Unicode minus sign).
Values are compared as exact decimals, so no float rounding decides whether an answer is right.
"""

from __future__ import annotations

import re
import unicodedata
from decimal import Decimal, InvalidOperation
from functools import lru_cache

DEFAULT_ANSWER_PHRASES: tuple[str, ...] = ("The answer is",)

# A number: optional sign (only when not glued to a preceding word or digit, so "10-3" is 10 and 3),
# digits with valid thousands groups ("1,000,000") or plain digits, optional decimals; or ".5".
_UNSIGNED = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+"
_NUMBER = rf"(?:(?<![\w.])[-+])?(?:{_UNSIGNED})"
_NUMBER_RE = re.compile(_NUMBER, re.ASCII)
# What may sit between an answer phrase and its number: spaces, colons, dashes, currency signs, "is"-like glue.
_GAP = r"[\s:：=—–$€£¥₹*]*"


def _to_ascii_digits(text: str) -> str:
    """NFKC (full-width forms) plus every Unicode decimal digit (Bengali, Thai, ...) mapped to 0-9."""
    text = unicodedata.normalize("NFKC", text).replace("\u2212", "-")
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


def extract_answer(output: str, phrases: tuple[str, ...] | list[str] = DEFAULT_ANSWER_PHRASES) -> Decimal | None:
    """The predicted number in ``output``: after the first answer phrase if any, else the last number."""
    text = _to_ascii_digits(output)
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
