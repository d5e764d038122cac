"""Generation throughput of our math evaluator's decoding loop vs lm-eval's HF backend (HFLM.generate_until).

Same model (a Llama-architecture model of ~10.5M parameters built locally and briefly trained on synthetic
1- to 6-step word problems with worked answers, so that its answers stop at different lengths like a real
model's), same prompts (held-out problems in our ``mgsm:en`` prompt template), same batch size, greedy, same
stop strings and max new tokens. The answers must be identical (asserted).

Throughput = useful new tokens per second: the tokens of every answer up to where it stopped (identical for
both, since the answers are identical) divided by the wall time. Runs alternate (ours, lm-eval, ours, ...) and
the medians of ``--repeats`` runs are printed with their ratio. Target: ours >= 1.5x lm-eval.

    .venv/bin/python experiments/benchmarks/eval_speed.py [--items 64] [--batch-size 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

from evomerge import tiny  # noqa: E402
from evomerge.evaluators import build_evaluator  # noqa: E402
from evomerge.evaluators.generation import greedy_generate  # noqa: E402

MODEL_SHAPE = dict(hidden_size=384, num_layers=6, num_heads=6, num_kv_heads=3, intermediate_size=1024,
                   max_position_embeddings=1024)
NAMES = ["Tom", "Ann", "Bob", "Eva", "Sam", "Mia", "Leo", "Zoe", "Kai", "Ivy"]
THINGS = ["apples", "books", "coins", "cards", "pens", "shells", "stamps", "marbles"]
DISTRACTORS = ["{other} likes the color {color}.", "It is a sunny day in the town.", "{other} is {age} years old.",
               "The shop opens at {age} in the morning.", "{other} has a dog called Rex."]
COLORS = ["red", "blue", "green", "yellow"]


def word_problem(rng: random.Random) -> tuple[str, str, int]:
    """A 1- to 6-step add/subtract word problem and its worked answer (about 20 to 130 tokens, like GSM8K's
    worked solutions): answer lengths vary like real ones.

    0-4 distractor sentences make the question's length independent of the answer's (as in real data, where
    a long question does not mean a long solution).
    """
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    total = rng.randint(5, 30)
    sentences, work = [f"{name} has {total} {thing}."], []
    for _ in range(rng.randint(0, 4)):
        other = rng.choice([n for n in NAMES if n != name])
        sentences.append(rng.choice(DISTRACTORS).format(other=other, color=rng.choice(COLORS),
                                                        age=rng.randint(5, 12)))
    for _ in range(rng.randint(1, 6)):
        amount = rng.randint(1, 9)
        if rng.random() < 0.5 or total <= amount:
            sentences.append(f"Then {name} gets {amount} more.")
            work.append(f"{name} had {total} {thing} and got {amount} more, so {name} has "
                        f"{total} + {amount} = {total + amount} {thing}.")
            total += amount
        else:
            sentences.append(f"Then {name} gives away {amount}.")
            work.append(f"{name} had {total} {thing} and gave away {amount}, so {name} has "
                        f"{total} - {amount} = {total - amount} {thing}.")
            total -= amount
    question = " ".join(sentences) + f" How many {thing} does {name} have now?"
    return question, " ".join(work) + f" The answer is {total}.", total


def build_model(cache_dir: Path, train_steps: int, device: str):
    """The benchmark model, trained once on multi-step word problems and cached (key: shape and steps)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = cache_dir / f"eval-speed-v3-llama-{MODEL_SHAPE['hidden_size']}x{MODEL_SHAPE['num_layers']}-s{train_steps}"
    if not (path / "config.json").is_file():
        rng = random.Random(0)
        texts = []
        for _ in range(4000):
            question, worked, _ = word_problem(rng)
            texts.append(f"Question: {question}\nStep-by-Step Answer: {worked}\n\n")
        tok = tiny.make_tokenizer(corpus=texts, vocab_size=1024)
        model = tiny.make_model("llama", seed=0, vocab_size=len(tok), **MODEL_SHAPE).train()
        encoded = [tok(t)["input_ids"] + [tok.eos_token_id] for t in texts]
        started = time.perf_counter()

        def log(step: int, loss: float) -> None:
            if step % 10 == 0 or step == train_steps - 1:
                print(f"  train step {step + 1}/{train_steps} loss {loss:.3f} "
                      f"({time.perf_counter() - started:.0f} s)", flush=True)

        tiny.train_causal_lm(model, encoded, tok.pad_token_id, steps=train_steps, batch_size=16, lr=2e-3,
                             rng=rng, log=log)
        tmp = Path(tempfile.mkdtemp(dir=cache_dir))
        model.eval().save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tmp.rename(path)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).to(device).eval()
    return model, AutoTokenizer.from_pretrained(path, local_files_only=True)


def write_items(path: Path, n: int) -> Path:
    """Held-out problems (another seed) as a TSV for our math evaluator."""
    rng = random.Random(12345)
    rows = []
    for _ in range(n):
        question, _, answer = word_problem(rng)
        rows.append(f"{question}\t{answer}\n")
    path.write_text("".join(rows), encoding="utf-8")
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=160)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "evomerge-bench"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HOME", str(cache / "hf"))

    model, tok = build_model(cache, args.train_steps, args.device)
    n_params = sum(p.numel() for p in model.parameters())
    data = write_items(cache / "eval_speed_items_v3.tsv", args.items)
    # our math evaluator with the mgsm:en prompt template, on held-out problems of the training kind
    ev = build_evaluator({"type": "math_word", "name": "eval_speed", "data": str(data), "language": "en",
                          "template": "mgsm_native_cot", "chat_template": "never",
                          "generation": {"batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens}})
    prompts, token_ids = ev.prompts(tok)
    settings = ev.settings

    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=args.batch_size, max_length=1024)
    gen_kwargs = {"until": list(settings.stop), "max_gen_toks": settings.max_new_tokens, "do_sample": False,
                  "temperature": 0.0}

    def run_ours():
        return greedy_generate(model, tok, prompts, settings, token_ids=token_ids)

    def run_lm_eval():
        requests = [Instance(request_type="generate_until", doc={}, arguments=(p, dict(gen_kwargs)), idx=i)
                    for i, p in enumerate(prompts)]
        return lm.generate_until(requests, disable_tqdm=True)

    print(f"model: llama {n_params / 1e6:.1f}M params, vocab {len(tok)}; device {args.device}, "
          f"{args.threads} threads; {len(prompts)} prompts (mgsm_native_cot template), batch {args.batch_size}, "
          f"max_new_tokens {settings.max_new_tokens}, stop {list(settings.stop)}")
    from evomerge.evaluators import decode_attention, lean_decode

    lean = lean_decode.lean_step_for(model) is not None
    kernel = lean and args.device == "cpu" and args.threads == 1 and decode_attention.available()
    print(f"our decoding step: {'lean (Llama family)' if lean else 'the model forward'}; attention: "
          f"{'C++ kernel' if kernel else 'SDPA'}")
    run_ours()  # warm-up both (first-call allocations)
    run_lm_eval()
    ours_times, theirs_times = [], []
    ours = theirs = None
    for r in range(args.repeats):
        t0 = time.perf_counter()
        ours = run_ours()
        ours_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        theirs = run_lm_eval()
        theirs_times.append(time.perf_counter() - t0)
        print(f"  run {r + 1}: ours {ours_times[-1]:.2f} s, lm-eval {theirs_times[-1]:.2f} s", flush=True)
    texts = [g.text for g in ours]
    mismatches = [i for i, (a, b) in enumerate(zip(texts, theirs)) if a != b]
    assert not mismatches, f"answers differ at items {mismatches[:5]}: {texts[mismatches[0]]!r} vs " \
                           f"{theirs[mismatches[0]]!r}"
    useful = sum(g.new_tokens for g in ours)
    lengths = sorted(g.new_tokens for g in ours)
    ours_med, theirs_med = statistics.median(ours_times), statistics.median(theirs_times)
    print(f"identical answers: {len(texts)}/{len(texts)}; useful new tokens {useful} "
          f"(per answer: min {lengths[0]}, median {lengths[len(lengths) // 2]}, max {lengths[-1]})")
    print(f"ours    : median {ours_med:.2f} s  -> {useful / ours_med:8.1f} new tokens/s")
    print(f"lm-eval : median {theirs_med:.2f} s  -> {useful / theirs_med:8.1f} new tokens/s")
    print(f"speedup : {theirs_med / ours_med:.2f}x (target >= 1.5x)")
    print(f"(accuracy of this briefly trained model: {ev.summarize(ev.run(model, tok))['acc']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
