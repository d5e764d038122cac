"""Offline language gate: is a model's output written in the target language? (Unicode script ratios.)

The evolutionary-merge paper counted an MGSM-JA answer only when fastText said the output was Japanese
(p > 0.5). fastText needs a model download; this gate needs nothing: it measures which Unicode scripts the
letters of the output belong to (digits, punctuation, spaces and symbols are ignored, since math output is full
of them).

- ja: Han + Hiragana + Katakana letters >= threshold of all letters, and kana >= 10% of those (kana is what
  tells Japanese from Chinese; real Japanese prose has far more).
- zh: Han letters >= threshold, and kana < 10% of Han + kana.
- th, ru, bn, te: Thai, Cyrillic, Bengali, Telugu letters >= threshold.
- en, de, fr, es, sw (Latin script): only "mostly Latin letters" can be checked, so English passes a German
  gate. Use these gates to reject outputs that switched to another script, not to tell Latin languages apart.
An output with no letters at all (e.g. only "42") is not in any language: a gated answer must say something.
"""

from __future__ import annotations

import unicodedata

DEFAULT_THRESHOLD = 0.5
_KANA_SHARE_FOR_JAPANESE = 0.10

# (first, last) code points per script; enough for the scripts of MGSM's languages.
_SCRIPT_RANGES: dict[str, tuple[tuple[int, int], ...]] = {
    "han": ((0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x2FA1F), (0x3005, 0x3007)),
    "kana": ((0x3040, 0x309F), (0x30A0, 0x30FF), (0x31F0, 0x31FF), (0xFF66, 0xFF9F)),
    "thai": ((0x0E00, 0x0E7F),),
    "cyrillic": ((0x0400, 0x04FF), (0x0500, 0x052F)),
    "bengali": ((0x0980, 0x09FF),),
    "telugu": ((0x0C00, 0x0C7F),),
    "latin": ((0x0041, 0x005A), (0x0061, 0x007A), (0x00C0, 0x024F), (0x1E00, 0x1EFF)),
}

LATIN_SCRIPT_LANGUAGES = ("en", "de", "fr", "es", "sw")
_SINGLE_SCRIPT = {"th": "thai", "ru": "cyrillic", "bn": "bengali", "te": "telugu",
                  **{lang: "latin" for lang in LATIN_SCRIPT_LANGUAGES}}
SUPPORTED_LANGUAGES = ("ja", "zh", *_SINGLE_SCRIPT)


def _script_of(ch: str) -> str | None:
    code = ord(ch)
    for script, ranges in _SCRIPT_RANGES.items():
        for first, last in ranges:
            if first <= code <= last:
                return script
    return None


def script_counts(text: str) -> dict[str, int]:
    """Letters of ``text`` by script (``other`` = letters of scripts not listed); non-letters are skipped.

    Thai, Bengali and Telugu vowel signs are combining marks, not letters, in Unicode; they count here too.
    """
    counts: dict[str, int] = {"letters": 0}
    for ch in text:
        if not (ch.isalpha() or (not ch.isascii() and _is_mark(ch))):
            continue
        counts["letters"] += 1
        script = _script_of(ch) or "other"
        counts[script] = counts.get(script, 0) + 1
    return counts


def _is_mark(ch: str) -> bool:
    return unicodedata.category(ch).startswith("M")


def language_score(text: str, language: str) -> float:
    """Share (0..1) of the letters of ``text`` written in ``language``'s script(s); 0 when there are no letters."""
    if language not in SUPPORTED_LANGUAGES:
        raise ValueError(f"no language gate for {language!r}; supported: {', '.join(SUPPORTED_LANGUAGES)}")
    counts = script_counts(text)
    letters = counts["letters"]
    if letters == 0:
        return 0.0
    han, kana = counts.get("han", 0), counts.get("kana", 0)
    if language == "ja":
        if han + kana == 0 or kana / (han + kana) < _KANA_SHARE_FOR_JAPANESE:
            return 0.0
        return (han + kana) / letters
    if language == "zh":
        if han == 0 or kana / (han + kana) >= _KANA_SHARE_FOR_JAPANESE:
            return 0.0
        return han / letters
    return counts.get(_SINGLE_SCRIPT[language], 0) / letters


def is_language(text: str, language: str, threshold: float = DEFAULT_THRESHOLD) -> bool:
    """True when at least ``threshold`` of the letters are in ``language``'s script (see module notes)."""
    return language_score(text, language) >= threshold
