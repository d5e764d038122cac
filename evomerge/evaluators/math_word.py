"""Math word problems (MGSM, GSM8K, or any TSV/JSONL of questions and numeric answers): accuracy by greedy
generation, with optional language gate.

Everything about a task is data (an evaluator YAML in the top-level ``evaluators/`` folder): the data file, the
prompt template (``evaluators/templates/NAME.yaml``), few-shot exemplars, generation settings, the language and
its gate, the named splits. This module loads that data, renders prompts, runs ``generation.greedy_generate``
and scores with ``answers.extract_answer``.

Splits and subsampling: a named split is a range of items (or another file); ``limit`` draws that many items
with ``random.Random(seed)`` once, at build time, so every candidate of a search sees exactly the same items.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError
from evomerge.evaluators.answers import DEFAULT_ANSWER_PHRASES, answers_equal, extract_answer, parse_number
from evomerge.evaluators.base import Evaluator, ItemScores, check_indices, check_keys, load_yaml, resolve_path
from evomerge.evaluators.generation import GenerationSettings, encode_prompts, greedy_generate
from evomerge.evaluators.language import DEFAULT_THRESHOLD, SUPPORTED_LANGUAGES, is_language

CONFIG_KEYS = {"type", "name", "description", "data", "question_field", "answer_field", "language", "template",
               "fewshot", "exemplars", "chat_template", "generation", "language_gate", "splits", "split",
               "answer_phrases", "metrics"}
GENERATION_KEYS = {"max_new_tokens", "batch_size", "stop"}
TEMPLATE_KEYS = {"description", "source", "prompt", "exemplar", "separator", "stop", "stop_at_question_prefix"}
ALL_METRICS = ("acc", "acc_lang", "lang_rate", "answered")


@dataclass(frozen=True)
class MathItem:
    """One problem: its position in the data file, the question and the exact gold answer."""

    index: int
    question: str
    answer: Decimal


@dataclass
class ItemResult:
    """How the model did on one item (for per-item comparisons and debugging)."""

    index: int
    question: str
    gold: Decimal
    output: str
    predicted: Decimal | None
    correct: bool
    in_language: bool | None
    new_tokens: int


def load_math_items(path: Path, question_field: str = "question", answer_field: str = "answer") -> list[MathItem]:
    """Items from a TSV (question <TAB> answer, no header) or JSONL (fields; GSM8K's "... #### N" answers)."""
    if not path.is_file():
        raise EvomergeError(f"math data file not found: {path}")
    items: list[MathItem] = []
    suffix = path.suffix.lower()
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            if suffix in (".tsv", ".txt"):
                question, sep, answer_text = line.rstrip("\n").rpartition("\t")
                if not sep:
                    raise EvomergeError(f"{path}:{line_no}: expected 'question<TAB>answer'")
            elif suffix in (".jsonl", ".json"):
                try:
                    record = json.loads(line)
                    question, answer_text = record[question_field], record[answer_field]
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise EvomergeError(f"{path}:{line_no}: need JSON with {question_field!r} and "
                                        f"{answer_field!r} ({exc})") from None
            else:
                raise EvomergeError(f"{path}: math data must be .tsv or .jsonl")
            answer_text = str(answer_text)
            if "####" in answer_text:
                answer_text = answer_text.rsplit("####", 1)[1]
            answer = parse_number(answer_text.strip())
            if answer is None:
                raise EvomergeError(f"{path}:{line_no}: answer {answer_text.strip()!r} is not a number")
            items.append(MathItem(index=len(items), question=str(question).strip(), answer=answer))
    if not items:
        raise EvomergeError(f"{path}: no items")
    return items


def subsample(items: list[MathItem], limit: int | None, seed: int) -> list[MathItem]:
    """``limit`` items drawn with ``seed`` (kept in data order); all items when limit is None or too large."""
    if limit is None or limit >= len(items):
        return list(items)
    if limit < 1:
        raise EvomergeError(f"limit must be >= 1, got {limit}")
    chosen = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in chosen]


def load_template(spec: str | dict, base_dir: Path, templates_dir: Path) -> dict[str, Any]:
    """A template: inline mapping, a YAML path (relative to the evaluator YAML), or a name in templates/."""
    if isinstance(spec, dict):
        template = dict(spec)
    else:
        candidates = [resolve_path(spec, base_dir), templates_dir / f"{spec}.yaml"]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            names = sorted(p.stem for p in templates_dir.glob("*.yaml"))
            raise EvomergeError(f"unknown prompt template {spec!r}; built-in: {', '.join(names)}")
        template = load_yaml(path)
    check_keys(template, TEMPLATE_KEYS, "prompt template")
    if "prompt" not in template or "{question}" not in str(template["prompt"]):
        raise EvomergeError("prompt template needs a 'prompt' containing {question}")
    return template


class MathWordEvaluator(Evaluator):
    """Accuracy on math word problems by greedy generation (see the module docstring)."""

    def __init__(self, config: dict[str, Any], base_dir: Path, evaluators_dir: Path, limit: int | None = None,
                 seed: int = 0) -> None:
        check_keys(config, CONFIG_KEYS, "math_word evaluator")
        config = dict(config)
        self.config = config
        self.language = str(config.get("language", "en"))
        self.name = str(config.get("name", "math_word"))
        languages = load_yaml(evaluators_dir / "languages.yaml")
        cues = languages.get(self.language, languages["en"])

        gen = dict(config.get("generation") or {})
        check_keys(gen, GENERATION_KEYS, "generation settings")
        self.template = load_template(config.get("template", "mgsm_native_cot"), base_dir,
                                      evaluators_dir / "templates")
        stop = list(gen.get("stop", [])) + list(self.template.get("stop", []))
        if self.template.get("stop_at_question_prefix"):
            stop.append(cues["question_prefix"].strip())
        self.settings = GenerationSettings(max_new_tokens=int(gen.get("max_new_tokens", 256)),
                                           batch_size=int(gen.get("batch_size", 16)),
                                           stop=tuple(dict.fromkeys(stop)))

        gate = config.get("language_gate", False)
        self.gate_threshold: float | None = None
        if gate:
            if self.language not in SUPPORTED_LANGUAGES:
                raise EvomergeError(f"no language gate for {self.language!r}; "
                                    f"supported: {', '.join(SUPPORTED_LANGUAGES)}")
            self.gate_threshold = float(gate.get("threshold", DEFAULT_THRESHOLD)) if isinstance(gate, dict) \
                else DEFAULT_THRESHOLD
        self.answer_phrases = tuple(dict.fromkeys([*config.get("answer_phrases", []),
                                                   *cues.get("answer_phrases", []), *DEFAULT_ANSWER_PHRASES]))
        self.chat_template = str(config.get("chat_template", "auto"))
        if self.chat_template not in ("auto", "always", "never"):
            raise EvomergeError("chat_template must be auto, always or never")

        self.split = str(config.get("split", "all"))
        self.items = subsample(self._load_split(config, base_dir), limit, seed)
        self.n_items = len(self.items)
        self.question_prefix, self.answer_prefix = cues["question_prefix"], cues["answer_prefix"]
        self.fewshot_block = self._fewshot_block(config, base_dir)

        available = ["acc", "answered"] + (["acc_lang", "lang_rate"] if self.gate_threshold is not None else [])
        wanted = config.get("metrics")
        if wanted:
            missing = [m for m in wanted if m not in available]
            if missing:
                raise EvomergeError(f"evaluator {self.name}: metric(s) {', '.join(missing)} not available; "
                                    f"available: {', '.join(available)}")
            available = list(wanted)
        self.metric_names = tuple(m for m in ALL_METRICS if m in available)
        self._prompt_cache: tuple[Any, list[str], list[list[int]]] | None = None

    # --- build-time helpers -------------------------------------------------------------------------------
    def _load_split(self, config: dict[str, Any], base_dir: Path) -> list[MathItem]:
        data_path = config.get("data")
        splits = config.get("splits") or {}
        span: Any = None
        if self.split != "all":
            if self.split not in splits:
                raise EvomergeError(f"evaluator {self.name}: unknown split {self.split!r}; "
                                    f"available: {', '.join(['all', *splits])}")
            span = splits[self.split]
            if isinstance(span, dict):
                data_path = span.get("data", data_path)
                span = span.get("range")
        if not data_path:
            raise EvomergeError(f"evaluator {self.name}: no 'data' file given")
        items = load_math_items(resolve_path(data_path, base_dir), str(config.get("question_field", "question")),
                                str(config.get("answer_field", "answer")))
        if span is not None:
            start, end = span
            end = len(items) if end is None else min(int(end), len(items))
            items = items[int(start):end]
            if not items:
                raise EvomergeError(f"evaluator {self.name}: split {self.split!r} {span} is empty")
        return items

    def _fewshot_block(self, config: dict[str, Any], base_dir: Path) -> str:
        k = int(config.get("fewshot", 0))
        if k <= 0:
            return ""
        if "exemplars" not in config:
            raise EvomergeError(f"evaluator {self.name}: fewshot needs an 'exemplars' file")
        path = resolve_path(config["exemplars"], base_dir)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise EvomergeError(f"cannot read exemplars {path}: {exc}") from None
        per_language = data.get("MGSM_EXEMPLARS", data).get(self.language)
        if not per_language:
            raise EvomergeError(f"{path}: no exemplars for language {self.language!r}")
        exemplars = [per_language[key] for key in sorted(per_language, key=int)][:k]
        if len(exemplars) < k:
            raise EvomergeError(f"fewshot {k} asked, only {len(exemplars)} exemplars for {self.language!r}")
        pattern = self.template.get("exemplar", "{q}\n{a}")
        separator = self.template.get("separator", "\n\n")
        parts = []
        for ex in exemplars:
            q_text = ex["q"][len(self.question_prefix):] if ex["q"].startswith(self.question_prefix) else ex["q"]
            a_text = ex["a"][len(self.answer_prefix):] if ex["a"].startswith(self.answer_prefix) else ex["a"]
            parts.append(pattern.format(q=ex["q"], a=ex["a"], q_text=q_text.strip(), a_text=a_text.strip()))
        return separator.join(parts) + separator

    # --- prompts ------------------------------------------------------------------------------------------
    def render_prompt(self, question: str, tokenizer=None) -> str:
        """The prompt text of one question (few-shot block, template, and the chat template when used)."""
        text = self.fewshot_block + self.template["prompt"].format(
            question=question, question_prefix=self.question_prefix, answer_prefix=self.answer_prefix)
        if tokenizer is not None and self._use_chat_template(tokenizer):
            text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                 add_generation_prompt=True)
        return text

    def _use_chat_template(self, tokenizer) -> bool:
        has = bool(getattr(tokenizer, "chat_template", None))
        if self.chat_template == "always" and not has:
            raise EvomergeError(f"evaluator {self.name}: chat_template is 'always' but the tokenizer has none")
        return has and self.chat_template != "never"

    def prompts(self, tokenizer) -> tuple[list[str], list[list[int]]]:
        """Prompt texts and token ids, cached per tokenizer (they depend on data + tokenizer, never weights)."""
        if self._prompt_cache is None or self._prompt_cache[0] is not tokenizer:
            texts = [self.render_prompt(item.question, tokenizer) for item in self.items]
            self._prompt_cache = (tokenizer, texts, encode_prompts(tokenizer, texts))
        return self._prompt_cache[1], self._prompt_cache[2]

    # --- evaluation ---------------------------------------------------------------------------------------
    def run(self, model, tokenizer, progress: bool = False, indices: Sequence[int] | None = None
            ) -> list[ItemResult]:
        """Generate and score the items (all, or those at ``indices`` in that order); per-item results."""
        texts, token_ids = self.prompts(tokenizer)
        positions = list(range(len(self.items))) if indices is None else list(indices)
        generations = greedy_generate(model, tokenizer, [texts[i] for i in positions], self.settings,
                                      token_ids=[token_ids[i] for i in positions], progress=progress)
        results = []
        for item, gen in zip((self.items[i] for i in positions), generations):
            predicted = self.read_answer(gen.text)
            in_language = None
            if self.gate_threshold is not None:
                in_language = is_language(gen.text, self.language, self.gate_threshold)
            results.append(ItemResult(index=item.index, question=item.question, gold=item.answer, output=gen.text,
                                      predicted=predicted, correct=answers_equal(predicted, item.answer),
                                      in_language=in_language, new_tokens=gen.new_tokens))
        return results

    def score_items(self, model, tokenizer, indices: Sequence[int]) -> ItemScores:
        """Per-item ``metric_names`` (1.0 / 0.0 each) of the items at ``indices`` (positions in ``items``);
        their means are what ``evaluate`` gives on those items."""
        positions = check_indices(indices, len(self.items), self.name)
        results = self.run(model, tokenizer, indices=positions)
        per_item = {"acc": [r.correct for r in results], "answered": [r.predicted is not None for r in results],
                    "acc_lang": [bool(r.correct and r.in_language) for r in results],
                    "lang_rate": [bool(r.in_language) for r in results]}
        return ItemScores(tuple(positions), {m: tuple(float(v) for v in per_item[m]) for m in self.metric_names})

    def read_answer(self, text: str) -> Decimal | None:
        """The number a model's ``text`` answers with, read in this evaluator's language ("70 000" in French,
        "70.000" in German; see ``numbers``), after its answer phrases."""
        return extract_answer(text, self.answer_phrases, self.language)

    def summarize(self, results: list[ItemResult]) -> dict[str, float]:
        """``acc``, ``answered`` and, with a language gate, ``acc_lang`` (fractions of the items), as in
        ``metric_names``."""
        n = max(len(results), 1)
        metrics = {"acc": sum(r.correct for r in results) / n,
                   "answered": sum(r.predicted is not None for r in results) / n}
        if self.gate_threshold is not None:
            metrics["acc_lang"] = sum(bool(r.correct and r.in_language) for r in results) / n
            metrics["lang_rate"] = sum(bool(r.in_language) for r in results) / n
        return {k: float(metrics[k]) for k in self.metric_names}

    def evaluate(self, model, tokenizer) -> dict[str, float]:
        """Greedy answers to every item, scored: see ``summarize`` for the metrics (fractions in [0, 1])."""
        return self.summarize(self.run(model, tokenizer))
