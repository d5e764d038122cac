"""Build the mini EvoLLM model zoo: a word-level tokenizer, a bilingual base model and two specialists.

    python experiments/mini_evollm/zoo.py            # build (or reuse) the zoo, print where it is

- base: a small Llama trained from scratch on both languages: plain and word-switched stories, parallel
  sentence pairs, arithmetic facts and simple question answering in both languages (so it already answers a
  question in the question's language, which merges need: otherwise the heavier model decides the language).
- spec_a: the base fine-tuned on language-1 math word problems with short step-by-step solutions.
- spec_b: the base fine-tuned on language-2 reading questions and language-2 plain text (stories and arithmetic
  facts such as "3 plus 4 is 7 ." in language 2), no word problems.

Everything is seeded and written as standard Hugging Face checkpoints (safetensors) under
``.cache/mini_evollm/<recipe hash>/``; the folder is reused until the recipe (or ZOO_VERSION) changes, and it is
built in a temporary folder and renamed, so an interrupted build never leaves a half zoo behind.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache, partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import languages as L  # noqa: E402

ZOO_VERSION = 3  # 3: specialist B's plain texts include language-2 arithmetic facts (b_mix_facts)
# The environment variables that cap the vector instruction set of torch's kernels, oneDNN and MKL. They are read
# when torch is imported, so a study forces a lower set by starting a fresh process with them set.
ISA_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CACHE = REPO_ROOT / ".cache" / "mini_evollm"
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<q>", "<a>"]


@dataclass(frozen=True)
class TrainSpec:
    steps: int
    lr: float
    batch: int = 32
    warmup: int = 30


@dataclass(frozen=True)
class ZooRecipe:
    """Everything that decides the zoo's contents; its hash names the cache folder."""

    seed: int = 0          # model initialisation and training order
    data_seed: int = 0     # the evaluation splits (kept fixed across model seeds so scores are comparable)
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    ffn: int = 384
    seq_len: int = 64
    base: TrainSpec = field(default_factory=lambda: TrainSpec(steps=1200, lr=3e-3))
    spec_a: TrainSpec = field(default_factory=lambda: TrainSpec(steps=300, lr=5e-4))
    spec_b: TrainSpec = field(default_factory=lambda: TrainSpec(steps=200, lr=5e-4))
    l2_word_order: str = field(default_factory=lambda: L.L2_WORD_ORDER)
    # base pretraining mixture (fractions of documents)
    mix_story: float = 0.2
    mix_switched: float = 0.35
    mix_parallel: float = 0.1
    mix_facts: float = 0.15
    mix_math_qa: float = 0.03  # math word problems with solutions, both languages: A's fine-tune becomes a refinement
    mix_qa: float = 0.17       # (the rest of the documents: reading and look-up questions, both languages)
    switch_p: float = 0.4
    two_step: float = 0.3
    # specialist B's plain texts (30% of its rows): this share are language-2 arithmetic facts, the rest
    # language-2 stories. B then writes arithmetic in language 2 but still cannot solve a word problem, as the
    # paper's Japanese model writes Japanese but does little math; measured (FEASIBILITY.md, issue 13): with
    # stories only, the verdict failed for zoo seed 2 on AVX-512 and zoo seed 0 on AVX2.
    b_mix_facts: float = 0.5
    n_search: int = 500
    n_test: int = 500
    n_test_late: int = 500  # more held-out target items (issue 13: a 1000-item test split narrows the intervals)
    n_eval_own: int = 300

    def digest(self) -> str:
        """The cache key: the recipe, ZOO_VERSION and the instruction set the training kernels dispatch to
        (different vector kernels round differently, so the same seed trains other weights on another CPU)."""
        blob = json.dumps({"version": ZOO_VERSION, "isa": instruction_set_key(), **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def instruction_set() -> str:
    """The vector instruction set torch's CPU kernels dispatch to in this process, e.g. ``avx512`` or ``avx2``."""
    return str(torch.backends.cpu.get_cpu_capability()).lower()


def instruction_set_key() -> dict[str, str]:
    """What decides the numerics of training on this CPU: torch's dispatch plus the oneDNN/MKL caps if set."""
    return {"aten": instruction_set(), **{k: os.environ[k] for k in ISA_ENV[1:] if os.environ.get(k)}}


# A miniature zoo for pipeline tests (seconds to build; its models know nothing).
TINY_RECIPE = ZooRecipe(hidden=32, layers=2, heads=2, ffn=64, seq_len=32,
                        base=TrainSpec(steps=6, lr=3e-3, batch=4, warmup=2),
                        spec_a=TrainSpec(steps=3, lr=5e-4, batch=4, warmup=1),
                        spec_b=TrainSpec(steps=3, lr=5e-4, batch=4, warmup=1))


# ----------------------------------------------------------------------------------------------------------
# Data splits (deterministic, disjoint by meaning)

@lru_cache(maxsize=8)
def make_splits(seed: int = 0, n_search: int = 500, n_test: int = 500, n_eval_own: int = 300,
                two_step: float = 0.3, n_test_late: int = 500) -> dict[str, list[L.Item]]:
    """The evaluation splits and the specialists' training pools, disjoint by meaning (frame key).

    target_search / target_test: language-2 math (the target, as in MGSM-JA vs the GSM8K-JA search set);
    target_test holds ``n_test`` items and then ``n_test_late`` more, drawn after every other split (so that
    adding them changed no other split and no fine-tune pool);
    math_l1_test / math_l1_search: specialist A's own task; qa_l2_test / qa_l2_search: specialist B's own task;
    a_train / b_train: the fine-tune pools.
    """
    rng = random.Random(10_000 + seed)

    def frame() -> L.MathFrame:
        return L.random_math_frame(rng, two_step)

    def question() -> L.Item:
        return L.qa_item(rng, 2)

    frames: dict[str, L.MathFrame] = {}
    fl = _draw_distinct(n_search + n_test + n_eval_own + 6000, frame, L.MathFrame.key, frames)
    i = 0
    out: dict[str, list[L.Item]] = {}
    for name, n, lang in (("target_search", n_search, 2), ("target_test", n_test, 2), ("math_l1_test", n_eval_own, 1)):
        out[name] = [L.math_item(f, lang) for f in fl[i:i + n]]
        i += n
    out["a_train"] = [L.math_item(f, 1) for f in fl[i:]]
    qa: dict[str, L.Item] = {}
    ql = _draw_distinct(n_eval_own + 6000, question, lambda it: it.key, qa)
    out["qa_l2_test"] = ql[:n_eval_own]
    out["b_train"] = ql[n_eval_own:]
    # search splits for the sources' own tasks (the multi-skill search), drawn after everything above so
    # the splits above never change, and disjoint from all of it
    out["math_l1_search"] = [L.math_item(f, 1) for f in _draw_distinct(n_eval_own, frame, L.MathFrame.key, frames)]
    out["qa_l2_search"] = _draw_distinct(n_eval_own, question, lambda it: it.key, qa)
    out["target_test"] += [L.math_item(f, 2) for f in _draw_distinct(n_test_late, frame, L.MathFrame.key, frames)]
    return out


def recipe_splits(r: ZooRecipe) -> dict[str, list[L.Item]]:
    """``make_splits`` for the recipe's split fields (cached: the same lists for equal fields)."""
    return make_splits(r.data_seed, r.n_search, r.n_test, r.n_eval_own, r.two_step, r.n_test_late)


def _draw_distinct(n: int, draw, key, seen: dict) -> list:
    """``n`` new draws, distinct by ``key`` and not already in ``seen`` (key -> draw, which this extends)."""
    new = []
    while len(new) < n:
        thing = draw()
        k = key(thing)
        if k not in seen:
            seen[k] = thing
            new.append(thing)
    return new


def held_out_keys(splits: dict[str, list[L.Item]]) -> frozenset[str]:
    return frozenset(it.key for name in ("target_search", "target_test", "math_l1_test", "qa_l2_test",
                                         "math_l1_search", "qa_l2_search") for it in splits[name])


def fact_words(rng: random.Random, lang: int) -> list[str]:
    """3-8 arithmetic facts ("a plus b is c .") in language ``lang``: a document of the base and of B."""
    words: list[str] = []
    for _ in range(rng.randint(3, 8)):
        words += L.arithmetic_fact(rng)[lang - 1]
    return words


def base_document(rng: random.Random, r: ZooRecipe, held_out: frozenset[str]) -> str:
    """One pretraining document drawn from the base mixture."""
    u = rng.random()
    lang = rng.choice((1, 2))
    if u < r.mix_story:
        l1w, l2w = L.story(rng, rng.randint(2, 5))
        words = l1w if lang == 1 else l2w
    elif u < r.mix_story + r.mix_switched:
        l1w, l2w = L.story(rng, rng.randint(2, 5))
        words = L.switch_words(l1w if lang == 1 else l2w, rng, r.switch_p)
    elif u < r.mix_story + r.mix_switched + r.mix_parallel:
        words = []
        for _ in range(rng.randint(1, 3)):
            a, b = L.s_story(rng)
            words += (a + ["="] + b) if rng.random() < 0.5 else (b + ["="] + a)
    elif u < r.mix_story + r.mix_switched + r.mix_parallel + r.mix_facts:
        words = fact_words(rng, lang)
    elif u < r.mix_story + r.mix_switched + r.mix_parallel + r.mix_facts + r.mix_math_qa:
        while True:
            it = L.math_item(L.random_math_frame(rng, r.two_step), lang)
            if it.key not in held_out:
                return L.qa_text(it)
    else:
        while True:
            it = L.qa_item(rng, lang) if rng.random() < 0.5 else L.count_item(rng, lang)
            if it.key not in held_out:
                break
        return L.qa_text(it)
    return " ".join(words)


def b_plain_text(rng: random.Random, r: ZooRecipe) -> str:
    """One of specialist B's plain language-2 texts: 3-8 arithmetic facts (share ``r.b_mix_facts``) or a story."""
    if rng.random() < r.b_mix_facts:
        return " ".join(fact_words(rng, 2))
    return " ".join(L.story(rng, rng.randint(2, 4))[1])


# ----------------------------------------------------------------------------------------------------------
# Tokenizer and model

def make_tokenizer():
    """A word-level tokenizer over both languages' words (one word = one token), saved as a HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + L.vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", padding_side="left")


def make_model(r: ZooRecipe, vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=r.hidden, num_hidden_layers=r.layers,
                      num_attention_heads=r.heads, num_key_value_heads=r.heads, intermediate_size=r.ffn,
                      max_position_embeddings=256, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
                      eos_token_id=2, rope_theta=10000.0)
    torch.manual_seed(r.seed)
    return LlamaForCausalLM(cfg)


def _lr_at(step: int, spec: TrainSpec) -> float:
    if step < spec.warmup:
        return spec.lr * (step + 1) / spec.warmup
    progress = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
    return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _train(model, spec: TrainSpec, next_batch, desc: str) -> list[float]:
    """A plain AdamW loop; ``next_batch(step)`` returns (input_ids, labels) tensors."""
    from tqdm import tqdm

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.95), weight_decay=0.01)
    losses = []
    bar = tqdm(range(spec.steps), desc=desc, mininterval=10)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, spec)
        ids, labels = next_batch(step)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.3f}")
    model.eval()
    return losses


def _packed_batches(tok, r: ZooRecipe, spec: TrainSpec, held_out: frozenset[str]):
    """Base pretraining batches: documents joined with end-of-text and cut into seq_len windows."""
    rng = random.Random(r.seed * 7919 + 1)
    buf: list[int] = []
    eos = tok.eos_token_id

    def next_batch(step: int):
        need = spec.batch * r.seq_len
        while len(buf) < need:
            buf.extend(tok(base_document(rng, r, held_out))["input_ids"] + [eos])
        chunk = torch.tensor(buf[:need]).view(spec.batch, r.seq_len)
        del buf[:need]
        # model(labels=...) shifts internally (labels[t] is predicted from ids[:t]): labels ARE the ids.
        # (ZOO_VERSION 1 passed pre-shifted labels, so its base learned to predict two tokens ahead.)
        return chunk, chunk.clone()

    return next_batch


def _qa_batches(tok, items: list[L.Item], spec: TrainSpec, seed: int, extra_text=None, extra_frac: float = 0.0):
    """Fine-tune batches: loss on the answer only (gentle, keeps task vectors small and mergeable).

    ``extra_text(rng)`` optionally supplies plain texts (loss on every token) for ``extra_frac`` of the rows.
    """
    rng = random.Random(seed)
    eos, pad = tok.eos_token_id, tok.pad_token_id

    def row():
        if extra_text is not None and rng.random() < extra_frac:
            ids = tok(extra_text(rng))["input_ids"] + [eos]
            return ids, list(ids)
        it = rng.choice(items)
        p = tok(L.prompt(it.question))["input_ids"]
        a = tok(it.answer, add_special_tokens=False)["input_ids"] + [eos]
        return p + a, [-100] * len(p) + a

    def next_batch(step: int):
        rows = [row() for _ in range(spec.batch)]
        width = max(len(x) for x, _ in rows)
        ids = torch.full((spec.batch, width), pad)
        labels = torch.full((spec.batch, width), -100)
        for i, (x, y) in enumerate(rows):
            ids[i, : len(x)] = torch.tensor(x)
            labels[i, : len(y)] = torch.tensor(y)
        # model(labels=...) shifts internally: labels[t] is predicted from ids[:t]
        return ids, labels

    return next_batch


# ----------------------------------------------------------------------------------------------------------
# Build / load

def zoo_dir(recipe: ZooRecipe, cache: Path | str | None = None) -> Path:
    """A stable folder per seed and instruction set; zoo.json records the recipe digest it holds."""
    root = Path(cache or os.environ.get("MINI_EVOLLM_CACHE") or DEFAULT_CACHE)
    return root / f"zoo-seed{recipe.seed}-{instruction_set()}"


def link_default(path: Path) -> Path:
    """Point ``zoo-seed<N>`` (the committed experiment YAMLs' paths) at ``path``, this CPU's zoo of that seed."""
    link = path.with_name(path.name.rsplit("-", 1)[0])
    if link.is_symlink() or not link.exists():
        tmp = link.with_name(link.name + f".link{os.getpid()}")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(path.name)
        tmp.replace(link)
    return link


def cached_digest(path: Path) -> str | None:
    try:
        return json.loads((path / "zoo.json").read_text()).get("digest")
    except (OSError, ValueError):
        return None


def build_zoo(recipe: ZooRecipe | None = None, cache: Path | str | None = None, threads: int = 2,
              force: bool = False) -> Path:
    """Build the zoo (or reuse the cached one) and return its folder: tokenizer/, base/, spec_a/, spec_b/.

    The cached zoo is reused when its recorded digest equals the recipe's (the recipe and ZOO_VERSION).
    """
    r = recipe or ZooRecipe()
    out = zoo_dir(r, cache)
    if not force and cached_digest(out) == r.digest():
        return out
    torch.set_num_threads(threads)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    info: dict = {"digest": r.digest(), "recipe": asdict(r), "version": ZOO_VERSION, "isa": instruction_set_key(),
                  "seconds": {}, "final_loss": {}}

    tok = make_tokenizer()
    tok.save_pretrained(tmp / "tokenizer")
    splits = recipe_splits(r)
    held = held_out_keys(splits)
    (tmp / "data").mkdir()
    for name, items in splits.items():
        with open(tmp / "data" / f"{name}.jsonl", "w") as fh:
            for it in items:
                fh.write(json.dumps(asdict(it)) + "\n")

    t0 = time.perf_counter()
    model = make_model(r, len(tok))
    losses = _train(model, r.base, _packed_batches(tok, r, r.base, held), "base")
    info["seconds"]["base"] = time.perf_counter() - t0
    info["final_loss"]["base"] = sum(losses[-50:]) / len(losses[-50:])
    model.save_pretrained(tmp / "base")
    tok.save_pretrained(tmp / "base")
    base_state = {k: v.clone() for k, v in model.state_dict().items()}

    for name, spec, items, extra, frac, seed in (
        ("spec_a", r.spec_a, splits["a_train"], None, 0.0, r.seed * 31 + 2),
        ("spec_b", r.spec_b, splits["b_train"], partial(b_plain_text, r=r), 0.3, r.seed * 31 + 3),
    ):
        t0 = time.perf_counter()
        model.load_state_dict(base_state)
        losses = _train(model, spec, _qa_batches(tok, items, spec, seed, extra, frac), name)
        info["seconds"][name] = time.perf_counter() - t0
        info["final_loss"][name] = sum(losses[-50:]) / len(losses[-50:])
        model.save_pretrained(tmp / name)
        tok.save_pretrained(tmp / name)

    (tmp / "zoo.json").write_text(json.dumps(info, indent=2))
    old = out.with_name(out.name + f".old{os.getpid()}")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default=None)
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("MINI_EVOLLM_THREADS", "1")))
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    path = build_zoo(replace(ZooRecipe(), seed=args.seed), args.cache, args.threads, args.force)
    link = link_default(path)
    print(f"zoo ready at {path} ({time.perf_counter() - t0:.1f} s); {link.name} points at it")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
