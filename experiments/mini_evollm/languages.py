"""Two tiny languages, their texts and their tasks: the data side of the mini EvoLLM experiment.

Language 1 ("L1") is English-like, subject-verb-object, with articles. Language 2 ("L2") has its own invented
function words, verbs, colours and places, puts the verb last (subject-object-verb), drops articles, and says the
number BEFORE its answer phrase ("14 kotae da ." where L1 says "the answer is 14 ."). Names, objects, containers
and numbers are shared, like loan words: the feasibility notes measured that shared content words make the
cross-language merge work at this scale.

Every text is built from one meaning (a "frame") rendered in either language, so the two languages are parallel
by construction and the same frame can never land in two splits. Texts are space-separated words (punctuation is
a word), which the word-level tokenizer in zoo.py maps one word to one token.
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass

NAMES = ["tom", "ana", "ben", "eva", "max", "lia", "sam", "zoe", "kim", "leo"]
OBJECTS = ["apples", "pens", "books", "cups", "balls", "eggs", "cards", "coins", "shells", "stones", "cakes", "toys"]
CONTAINERS = ["bags", "boxes", "baskets", "jars"]
NUMBERS = [str(i) for i in range(200)]
SHARED_WORDS = NAMES + OBJECTS + CONTAINERS + NUMBERS + [".", "?", ",", "="]

COLORS = ["red", "blue", "green", "yellow", "white", "black", "pink", "brown"]
PLACES = ["park", "house", "school", "garden", "shop", "river", "beach", "farm"]
ANIMALS = ["cat", "dog", "bird", "fish", "horse", "cow"]
STORY_VERBS = ["sleeps", "plays", "runs", "sings", "walks", "waits"]
# Glosses: the words of L1, plus a few L2-only concepts (spelled with "_", never emitted in L1 text).
L1_FUNCTION = ["has", "buys", "finds", "gets", "loses", "gives", "eats", "sells", "more", "to", "how", "many",
               "does", "have", "now", "each", "the", "a", "is", "in", "and", "what", "color", "where", "answer",
               "plus", "minus", "times", "with", "likes", "sees", "goes", "there", "are", "of", "also", "then"]
L2_ONLY = ["how_many", "what_color", "topic"]
L1_ONLY = ["does", "the", "a", "how", "many", "what", "color", "are", "there"]
TRANSLATED = COLORS + PLACES + ANIMALS + STORY_VERBS + [w for w in L1_FUNCTION if w not in L1_ONLY] + L2_ONLY

_CONSONANTS = "kstnmrpbdgzh"
_VOWELS = "aiueo"


def _invent_words(glosses: list[str], taken: set[str], seed: int = 1234) -> dict[str, str]:
    """One invented, pronounceable, unique L2 word per gloss (seeded, so the language is fixed)."""
    rng = random.Random(seed)
    out: dict[str, str] = {}
    used = set(taken)
    for gloss in glosses:
        while True:
            n_syll = 2 if rng.random() < 0.7 else 3
            word = "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(n_syll))
            if word not in used:
                break
        used.add(word)
        out[gloss] = word
    return out


L2_WORD = _invent_words(TRANSLATED, taken=set(SHARED_WORDS) | set(L1_FUNCTION) | set(COLORS) | set(PLACES)
                        | set(ANIMALS) | set(STORY_VERBS))
L1_SPECIFIC = set(COLORS + PLACES + ANIMALS + STORY_VERBS + L1_FUNCTION)
L2_SPECIFIC = set(L2_WORD.values())
# L1 words that have a one-word L2 equivalent (used for word switching); L1-only words have none.
L1_TO_L2 = {w: L2_WORD[w] for w in TRANSLATED if w in L1_SPECIFIC}
L2_TO_L1 = {v: k for k, v in L1_TO_L2.items()}
OPS = {"+": "plus", "-": "minus", "*": "times"}


def l2(glosses: list[str]) -> list[str]:
    """Render a gloss sequence (already in L2 word order) as L2 words; shared words pass through."""
    return [L2_WORD.get(g, g) for g in glosses]


# L2's word order: "svo" (L1's order, L1-only words dropped; the default) or "sov" (its own: verb last, no
# articles). Measured on this zoo: with "sov", specialist A solved 3.6% of L2 problems in any language, with
# "svo" 12.4% (A's own L1 math: 36-42%), so the default is "svo"; set MINI_EVOLLM_L2_ORDER=sov to try the other.
# Either way L2 has its own function words, verbs, colours and places, no articles, and the number before the
# answer phrase.
L2_WORD_ORDER = os.environ.get("MINI_EVOLLM_L2_ORDER", "svo")
_SVO_MERGE = {("how", "many"): "how_many", ("what", "color"): "what_color"}
_SVO_DROP = {"the", "a", "does", "are", "there"}


def pair(l1_words: list[str], sov_glosses: list[str]) -> tuple[list[str], list[str]]:
    """One meaning in both languages: L1 words, and L2 words in L2's word order."""
    if L2_WORD_ORDER == "sov":
        return l1_words, l2(sov_glosses)
    glosses: list[str] = []
    i = 0
    while i < len(l1_words):
        two = tuple(l1_words[i:i + 2])
        if two in _SVO_MERGE:
            glosses.append(_SVO_MERGE[two])
            i += 2
            continue
        if l1_words[i] not in _SVO_DROP:
            glosses.append(l1_words[i])
        i += 1
    return l1_words, l2(glosses)


def vocabulary() -> list[str]:
    """Every word either language can produce, in a fixed order."""
    words = list(dict.fromkeys(SHARED_WORDS + sorted(L1_SPECIFIC) + sorted(L2_SPECIFIC)))
    return words


# ----------------------------------------------------------------------------------------------------------
# Sentences: each returns (L1 words, L2 words) for one meaning.

def s_has(n: str, k: int, o: str):
    return pair([n, "has", str(k), o, "."], [n, str(k), o, "has", "."])


def s_has_color(n: str, c: str, o: str):
    return pair([n, "has", c, o, "."], [n, c, o, "has", "."])


def s_in_place(n: str, p: str):
    return pair([n, "is", "in", "the", p, "."], [n, p, "in", "is", "."])


def s_event(verb: str, n: str, k: int, o: str, other: str | None = None):
    """A change of quantity: buys/finds/gets (+) or loses/eats/sells/gives (-)."""
    if verb == "gives":
        return pair([n, "gives", str(k), o, "to", other, "."], [n, other, "to", str(k), o, "gives", "."])
    more = ["more"] if verb in ("buys", "finds", "gets") else []
    return pair([n, verb, str(k), *more, o, "."], [n, str(k), *more, o, verb, "."])


def s_containers(n: str, a: int, box: str, b: int, o: str):
    l1 = [n, "has", str(a), box, ".", "each", box, "has", str(b), o, "."]
    return pair(l1, [n, str(a), box, "has", ".", box, "each", str(b), o, "has", "."])


def s_story(rng: random.Random):
    """One plain, non-math story sentence (some with numbers, as real text has)."""
    n, n2 = rng.sample(NAMES, 2)
    kind = rng.randrange(8)
    if kind == 0:
        return s_has_color(n, rng.choice(COLORS), rng.choice(OBJECTS))
    if kind == 1:
        return s_in_place(n, rng.choice(PLACES))
    if kind == 2:
        a, p = rng.choice(ANIMALS), rng.choice(PLACES)
        v = rng.choice(STORY_VERBS)
        return pair(["the", a, v, "in", "the", p, "."], [a, p, "in", v, "."])
    if kind == 3:
        p = rng.choice(PLACES)
        return pair([n, "goes", "to", "the", p, "with", n2, "."], [n, n2, "with", p, "to", "goes", "."])
    if kind == 4:
        c, a = rng.choice(COLORS), rng.choice(ANIMALS)
        return pair([n, "sees", "a", c, a, "."], [n, c, a, "sees", "."])
    if kind == 5:
        return s_has(n, rng.randint(1, 20), rng.choice(OBJECTS))
    if kind == 6:
        verb = rng.choice(["buys", "finds", "gets", "loses", "eats", "sells", "gives"])
        return s_event(verb, n, rng.randint(1, 9), rng.choice(OBJECTS), other=n2)
    o, c = rng.choice(OBJECTS), rng.choice(COLORS)
    return pair(["the", o, "of", n, "are", c, "."], [n, "topic", o, c, "is", "."])


def story(rng: random.Random, n_sentences: int) -> tuple[list[str], list[str]]:
    l1w: list[str] = []
    l2w: list[str] = []
    for _ in range(n_sentences):
        a, b = s_story(rng)
        l1w += a
        l2w += b
    return l1w, l2w


def switch_words(words: list[str], rng: random.Random, p: float) -> list[str]:
    """Word switching: each word that has an equivalent in the other language is swapped with probability p."""
    out = []
    for w in words:
        other = L1_TO_L2.get(w) or L2_TO_L1.get(w)
        out.append(other if other is not None and rng.random() < p else w)
    return out


def arithmetic_fact(rng: random.Random) -> tuple[list[str], list[str]]:
    """'a plus b is c .' in both languages (same order: the facts are the bridge between them)."""
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(0, 12), rng.randint(0, 12)
        c = a * b
    elif op == "+":
        a, b = rng.randint(0, 99), rng.randint(0, 9)
        if rng.random() < 0.5:
            a, b = b, a
        c = a + b
    else:
        a, b = rng.randint(0, 99), rng.randint(0, 9)
        a = max(a, b)
        c = a - b
    return pair([str(a), OPS[op], str(b), "is", str(c), "."], [str(a), OPS[op], str(b), "is", str(c), "."])


# ----------------------------------------------------------------------------------------------------------
# Question-answer items. A prompt is "<q> question <a>", the answer follows, then the end-of-text token.

@dataclass(frozen=True)
class Item:
    """One question with its gold answer, in one language. ``key`` identifies the meaning (for disjoint splits)."""

    key: str
    lang: int
    question: str
    answer: str          # the full gold answer text (training target)
    gold: str            # what scoring compares: the number (math) or the answer sentence (QA)
    task: str            # "math" or "qa" or "count"


def prompt(question: str) -> str:
    return f"<q> {question} <a>"


@dataclass(frozen=True)
class MathFrame:
    """A word problem's meaning: a start (plain count or containers) and up to two events."""

    name: str
    other: str
    obj: str
    box: str
    start: tuple  # ("has", a) or ("boxes", a, b)
    events: tuple  # ((verb, k), ...)

    def key(self) -> str:
        return f"m|{self.name}|{self.other}|{self.obj}|{self.box}|{self.start}|{self.events}"


_PLUS = ("buys", "finds", "gets")
_MINUS = ("loses", "eats", "sells", "gives")


def random_math_frame(rng: random.Random, two_step: float = 0.3) -> MathFrame:
    name, other = rng.sample(NAMES, 2)
    obj, box = rng.choice(OBJECTS), rng.choice(CONTAINERS)
    steps = 2 if rng.random() < two_step else 1
    use_boxes = rng.random() < (0.4 if steps == 1 else 0.5)
    if use_boxes:
        start = ("boxes", rng.randint(2, 9), rng.randint(2, 9))
        value = start[1] * start[2]
        n_events = steps - 1
    else:
        start = ("has", rng.randint(1, 20))
        value = start[1]
        n_events = steps
    events = []
    for _ in range(n_events):
        if rng.random() < 0.5 or value < 2:
            verb, k = rng.choice(_PLUS), rng.randint(1, 9)
            value += k
        else:
            verb, k = rng.choice(_MINUS), rng.randint(1, min(9, value))
            value -= k
        events.append((verb, k))
    return MathFrame(name, other, obj, box, start, tuple(events))


def math_item(frame: MathFrame, lang: int) -> Item:
    """Render a word problem and its short step-by-step solution ("a plus b is c . the answer is c .")."""
    f = frame
    if f.start[0] == "boxes":
        q1, q2 = s_containers(f.name, f.start[1], f.box, f.start[2], f.obj)
        value = f.start[1] * f.start[2]
        steps = [(f.start[1], "times", f.start[2], value)]
    else:
        q1, q2 = s_has(f.name, f.start[1], f.obj)
        value = f.start[1]
        steps = []
    for verb, k in f.events:
        e1, e2 = s_event(verb, f.name, k, f.obj, other=f.other)
        q1, q2 = q1 + e1, q2 + e2
        new = value + k if verb in _PLUS else value - k
        steps.append((value, "plus" if verb in _PLUS else "minus", k, new))
        value = new
    qa, qb = pair(["how", "many", f.obj, "does", f.name, "have", "now", "?"],
                  [f.name, "now", f.obj, "how_many", "have", "?"])
    q1, q2 = q1 + qa, q2 + qb
    a1: list[str] = []
    a2: list[str] = []
    for x, op, y, z in steps:
        a1 += [str(x), op, str(y), "is", str(z), "."]
        a2 += l2([str(x), op, str(y), "is", str(z), "."])
    a1 += ["the", "answer", "is", str(value), "."]
    a2 += l2([str(value), "answer", "is", "."])
    q, a = (q1, a1) if lang == 1 else (q2, a2)
    return Item(frame.key(), lang, " ".join(q), " ".join(a), str(value), "math")


def qa_item(rng: random.Random, lang: int) -> Item:
    """A non-numeric reading question: the colour of someone's objects, or where someone is."""
    n1, n2 = rng.sample(NAMES, 2)
    if rng.random() < 0.5:
        o1, o2 = rng.sample(OBJECTS, 2)
        c1, c2 = rng.sample(COLORS, 2)
        pick = rng.randrange(2)
        n, o, c = (n1, o1, c1) if pick == 0 else (n2, o2, c2)
        s1, t1 = s_has_color(n1, c1, o1)
        s2, t2 = s_has_color(n2, c2, o2)
        key = f"c|{n1}|{o1}|{c1}|{n2}|{o2}|{c2}|{pick}"
        if lang == 1:
            q = s1 + s2 + ["what", "color", "are", "the", o, "of", n, "?"]
            a = ["the", o, "of", n, "are", c, "."]
        else:
            q = t1 + t2 + pair(["what", "color", "are", "the", o, "of", n, "?"],
                               [n, "topic", o, "what_color", "is", "?"])[1]
            a = pair(["the", o, "of", n, "are", c, "."], [n, "topic", o, c, "is", "."])[1]
    else:
        p1, p2 = rng.sample(PLACES, 2)
        pick = rng.randrange(2)
        n, p = (n1, p1) if pick == 0 else (n2, p2)
        s1, t1 = s_in_place(n1, p1)
        s2, t2 = s_in_place(n2, p2)
        key = f"p|{n1}|{p1}|{n2}|{p2}|{pick}"
        if lang == 1:
            q, a = s1 + s2 + ["where", "is", n, "?"], s_in_place(n, p)[0]
        else:
            q, a = t1 + t2 + pair(["where", "is", n, "?"], [n, "where", "is", "?"])[1], s_in_place(n, p)[1]
    ans = " ".join(a)
    return Item(key, lang, " ".join(q), ans, ans, "qa")


def count_item(rng: random.Random, lang: int) -> Item:
    """A numeric look-up question with no arithmetic ("how many cups does ana have ?" -> "ana has 4 cups .")."""
    n1, n2 = rng.sample(NAMES, 2)
    o1, o2 = rng.sample(OBJECTS, 2)
    k1, k2 = rng.randint(1, 30), rng.randint(1, 30)
    pick = rng.randrange(2)
    n, o, k = (n1, o1, k1) if pick == 0 else (n2, o2, k2)
    s1, t1 = s_has(n1, k1, o1)
    s2, t2 = s_has(n2, k2, o2)
    if lang == 1:
        q, a = s1 + s2 + ["how", "many", o, "does", n, "have", "?"], s_has(n, k, o)[0]
    else:
        q, a = t1 + t2 + pair(["how", "many", o, "does", n, "have", "?"], [n, o, "how_many", "have", "?"])[1], \
            s_has(n, k, o)[1]
    return Item(f"k|{n1}|{o1}|{k1}|{n2}|{o2}|{k2}|{pick}", lang, " ".join(q), " ".join(a), str(k), "count")


def qa_text(item: Item) -> str:
    return f"{prompt(item.question)} {item.answer}"


# ----------------------------------------------------------------------------------------------------------
# Scoring helpers shared by the evaluator and the tests.

_NUMBER = re.compile(r"-?\d+")


def last_number(text: str) -> str | None:
    """The last integer in a text (the paper's rule: the last number in the output is the answer)."""
    found = _NUMBER.findall(text)
    return found[-1] if found else None


def language_of(text: str) -> int | None:
    """1 or 2 when more than half of the language-specific words belong to that language, else None.

    This is the miniature of the paper's language gate (fastText language id > 0.5): shared words (names,
    objects, numbers, punctuation) say nothing, so an output made only of them has no language.
    """
    n1 = n2 = 0
    for w in text.split():
        if w in L2_SPECIFIC:
            n2 += 1
        elif w in L1_SPECIFIC:
            n1 += 1
    if n1 + n2 == 0:
        return None
    if n2 / (n1 + n2) > 0.5:
        return 2
    if n1 / (n1 + n2) > 0.5:
        return 1
    return None


def first_sentence(text: str) -> str:
    words = text.split()
    if "." in words:
        words = words[: words.index(".") + 1]
    return " ".join(words)
