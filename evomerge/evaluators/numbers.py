"""How each language writes numbers, and rewriting a model's output into one plain form before answers are read.

A model answering in French writes seventy thousand as "70 000" (a space, U+00A0 or U+202F between the groups)
and one and a half as "1,5"; in German "70.000" and "1,5"; in LaTeX "9{,}500" or "9\\,500"; a loss of five
dollars as "-$5". Read with English rules these give 70, 70, 9 and 5. ``normalize_numbers(text, language)``
rewrites every number written in ``language``'s conventions as plain digits with "." as the decimal point
("70000", "1.5", "-5"), so the extractor in ``answers`` reads one form only.

Conventions (``NUMBER_FORMATS``), checked against the MGSM questions in each language (/work/shared/data/mgsm:
de writes "80.000" and "1,50", fr/es/ru write "80 000" and "1,50", the others "80,000" and "1.50"), and the
CLDR number symbols of each locale:

- en, bn, ja, sw, te, th, zh: groups with ",", decimal point ".";
- de: groups with ".", decimal comma ",";
- fr, ru: groups with a space (U+0020, U+00A0, U+202F or U+2009), decimal comma ",";
- es: groups with a space or ".", decimal comma ",";
- ja, zh also count in myriads: "8万" is 80000, "1万5000" 15000, "1億2000万" / "1亿2000万" 120000000 (MGSM-ja
  writes "8万ドル" for $80,000).

In every language a no-break, narrow no-break or thin space between digit groups (the SI / ISO 80000 style) is a
group separator, as are LaTeX's ``{,}`` (read as the language's comma), ``\\,`` and ``\\;``. A plain space groups
digits only in the languages that write numbers that way (in English "in 2 000 boxes" stays two numbers, as
before). A group is exactly three digits; a mark followed by another count of digits is not a group mark
("1.5" in a German answer is still one and a half: the English decimal point, read as before). In a
decimal-comma language "70,000" is seventy (the comma is the decimal mark there), as a reader of that language
would take it. A sign written before a currency symbol ("-$5", "−€5") belongs to the number (-5).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal
from functools import lru_cache

#: Spaces that only ever separate digit groups between digits (no-break, narrow no-break, thin, figure space).
GROUP_SPACES = "\u00a0\u202f\u2009\u2007"
CURRENCY_SYMBOLS = "$€£¥₹₽₩₺₦"


@dataclass(frozen=True)
class NumberFormat:
    """How one language writes numbers: its digit-group marks and its decimal mark."""

    group_marks: tuple[str, ...]
    decimal_mark: str


_POINT = NumberFormat(group_marks=(",",), decimal_mark=".")
_SPACES = (" ", *GROUP_SPACES)

#: MGSM's languages (plus their usual codes); a language not listed reads numbers the English way.
NUMBER_FORMATS: dict[str, NumberFormat] = {
    **{lang: _POINT for lang in ("en", "bn", "ja", "sw", "te", "th", "zh")},
    "de": NumberFormat(group_marks=(".",), decimal_mark=","),
    "fr": NumberFormat(group_marks=_SPACES, decimal_mark=","),
    "ru": NumberFormat(group_marks=_SPACES, decimal_mark=","),
    "es": NumberFormat(group_marks=(*_SPACES, "."), decimal_mark=","),
}

# LaTeX spacing commands used between digit groups ("70\,000"), and a sign glued to a currency symbol.
_LATEX_SPACE = re.compile(r"(?<=\d)\\[,;:!](?=\d)")
_LATEX_MARK = re.compile(r"(?<=\d)\{([,.])\}(?=\d)")
_MYRIAD_LANGUAGES = ("ja", "zh")
_MYRIADS = {"万": 10**4, "萬": 10**4, "億": 10**8, "亿": 10**8}
_MYRIAD_NUMBER = re.compile(r"(?<![\d.])(?:(\d+(?:\.\d+)?)[億亿])?(?:(\d+(?:\.\d+)?)[万萬])?(\d+)?")
_SIGNED_CURRENCY = re.compile(rf"(?<![\w.])([-+])\\?[{re.escape(CURRENCY_SYMBOLS)}]\s?(?=\d)")


def number_format(language: str | None) -> NumberFormat:
    """The NumberFormat of ``language`` (an MGSM code such as "de"); English conventions for any other."""
    return NUMBER_FORMATS.get((language or "en").split("-")[0].split("_")[0].lower(), _POINT)


@lru_cache(maxsize=32)
def _number_regex(fmt: NumberFormat) -> re.Pattern[str]:
    marks = tuple(dict.fromkeys((*fmt.group_marks, *GROUP_SPACES)))
    group = "|".join(re.escape(m) for m in marks)
    decimal = re.escape(fmt.decimal_mark)
    return re.compile(rf"(?<![\d])(?:(?P<grouped>\d{{1,3}}(?P<mark>{group})\d{{3}}(?:(?P=mark)\d{{3}})*)(?!\d)"
                      rf"|(?P<plain>\d+))(?:{decimal}(?P<frac>\d+))?")


def normalize_numbers(text: str, language: str | None = "en") -> str:
    """``text`` with every number in ``language``'s conventions rewritten as plain digits and a "." decimal point.

    Args:
        text: model output, already NFKC-normalised except for the spaces in ``GROUP_SPACES``, ASCII digits.
        language: the evaluator's language code (see ``NUMBER_FORMATS``).
    Returns:
        The text with numbers rewritten: "70 000" -> "70000" (fr), "70.000" -> "70000" (de),
        "1,5" -> "1.5" (de/fr/es/ru), "9{,}500" -> "9500" (en), "-$5" -> "-5". Everything else is unchanged.
    """
    fmt = number_format(language)
    text = _LATEX_MARK.sub(lambda m: m.group(1), text)
    text = _LATEX_SPACE.sub("\u2009", text)
    text = _SIGNED_CURRENCY.sub(lambda m: m.group(1), text)

    def plain(match: re.Match[str]) -> str:
        """One matched number without digit-group marks, with ``.`` as its decimal mark."""
        if match["grouped"] is not None:
            digits = match["grouped"].replace(match["mark"], "")
        else:
            digits = match["plain"]
        return digits if match["frac"] is None else f"{digits}.{match['frac']}"

    text = _number_regex(fmt).sub(plain, text)
    if (language or "en")[:2].lower() in _MYRIAD_LANGUAGES:
        text = _MYRIAD_NUMBER.sub(_myriad_value, text)
    return text


def _myriad_value(match: re.Match[str]) -> str:
    """"1億2000万" -> "120000000": a number written with the CJK myriad units (only when a unit is present)."""
    oku, man, rest = match.groups()
    if oku is None and man is None:
        return match.group(0)
    value = Decimal(oku or 0) * _MYRIADS["億"] + Decimal(man or 0) * _MYRIADS["万"] + Decimal(rest or 0)
    return format(value.normalize(), "f") if value != value.to_integral_value() else str(int(value))


__all__ = ["GROUP_SPACES", "NUMBER_FORMATS", "NumberFormat", "normalize_numbers", "number_format"]
