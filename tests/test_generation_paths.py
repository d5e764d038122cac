"""Our batched greedy decoding on several architectures: the preallocated-cache path (Llama, Qwen2, Mistral,
GPT-2; the first three through the lean decoding step) and the generic path (a sliding window a sequence
reaches) give every prompt ``generate()``'s greedy tokens, with refills, row moves and the cache window moved
back to the buffer's start; the per-token stop-string pre-check never skips a token that completes a stop
string."""

from __future__ import annotations

import random

import pytest
import torch

from evomerge import tiny
from evomerge.evaluators import generation, lean_decode
from evomerge.evaluators.generation import GenerationSettings, greedy_generate

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WORDS = ["Question:", "Tom", "has", "3", "apples", "and", "gets", "more", ".", "How", "many", "?", "The",
         "answer", "is", "7", "\n"]


@pytest.fixture(scope="module")
def tokenizer():
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(30)) for _ in range(200)]
    return tiny.make_tokenizer(corpus=corpus, vocab_size=200)


def make_model(arch: str, vocab_size: int, **extra):
    if arch == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        config = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=256,
                            bos_token_id=1, eos_token_id=2, pad_token_id=0)
        return GPT2LMHeadModel(config).eval()
    return tiny.make_model(arch, seed=0, vocab_size=vocab_size, hidden_size=32, num_layers=2, num_heads=4,
                           num_kv_heads=2, intermediate_size=64, **extra).eval()


def prompts_of_many_lengths(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS[1:]) for _ in range(rng.randint(1, 25))) for _ in range(n)]


def generate_alone(model, tok, prompt: str, max_new_tokens: int) -> list[int]:
    ids = tok(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return out[0, ids["input_ids"].shape[1]:].tolist()


def assert_same_as_generate(model, tok, prompts, results, max_new_tokens: int) -> None:
    for prompt, gen in zip(prompts, results):
        ref = generate_alone(model, tok, prompt, max_new_tokens)
        assert gen.token_ids == ref[:len(gen.token_ids)], prompt
        assert len(gen.token_ids) == max_new_tokens or gen.token_ids[-1] == tok.eos_token_id


def count_calls(monkeypatch, cls, name: str) -> list[int]:
    """Count calls of ``cls.name`` (the real method still runs)."""
    calls = [0]
    real = getattr(cls, name)

    def counted(self, *args, **kwargs):
        calls[0] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, counted)
    return calls


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt2"])
def test_preallocated_cache_path_matches_generate(arch, tokenizer, monkeypatch):
    model = make_model(arch, len(tokenizer))
    fast = count_calls(monkeypatch, generation._SlotDecoder, "run")
    generic = count_calls(monkeypatch, generation._StreamDecoder, "run")
    moved = count_calls(monkeypatch, generation._KVBuffers, "move_rows")
    prompts = prompts_of_many_lengths(9, seed=1)
    results = greedy_generate(model, tokenizer, prompts, GenerationSettings(max_new_tokens=10, batch_size=3))
    assert fast[0] == 1 and generic[0] == 0
    assert_same_as_generate(model, tokenizer, prompts, results, 10)
    if len({len(g.token_ids) for g in results}) > 1:
        assert moved[0] > 0, "rows of different lengths finish at different steps: some rows must move"


def test_window_moves_back_to_the_buffer_start(tokenizer, monkeypatch):
    """Many prompts through a small batch: the shared write column passes the buffer's end several times."""
    model = make_model("llama", len(tokenizer))
    moves = count_calls(monkeypatch, generation._KVBuffers, "move_columns")
    prompts = prompts_of_many_lengths(40, seed=2)
    results = greedy_generate(model, tokenizer, prompts, GenerationSettings(max_new_tokens=8, batch_size=2))
    assert moves[0] >= 2
    assert_same_as_generate(model, tokenizer, prompts, results, 8)


@pytest.mark.parametrize("window, batch, fast_runs", [(4, 1, 0), (4096, 2, 1)])
def test_sliding_window_path_choice(tokenizer, monkeypatch, window, batch, fast_runs):
    """A window a sequence can reach needs the generic cache; one it cannot reach is full attention (fast path)."""
    model = make_model("mistral", len(tokenizer), sliding_window=window)
    fast = count_calls(monkeypatch, generation._SlotDecoder, "run")
    prompts = prompts_of_many_lengths(4 + fast_runs, seed=3 + fast_runs)
    results = greedy_generate(model, tokenizer, prompts, GenerationSettings(max_new_tokens=6, batch_size=batch))
    assert fast[0] == fast_runs
    assert_same_as_generate(model, tokenizer, prompts, results, 6)


def test_zero_new_tokens(tokenizer):
    model = make_model("llama", len(tokenizer))
    results = greedy_generate(model, tokenizer, ["Tom has", "How many"], GenerationSettings(max_new_tokens=0))
    assert [(g.text, g.new_tokens, g.token_ids) for g in results] == [("", 0, []), ("", 0, [])]


def test_stop_pre_check_never_skips_a_completing_token(tokenizer):
    """Whenever appending a token makes a stop string newly appear in the decoded text, that token is flagged."""
    stop = ("\n\n", "Question:", "is 7", "日本")
    flags = generation._tokens_that_may_end_a_stop_string(tokenizer, stop)
    assert flags is not None and 0 < sum(flags) < len(flags)
    colon = tokenizer.convert_tokens_to_ids(":") if ":" in tokenizer.get_vocab() else None
    if colon is not None:
        assert flags[colon]
    rng = random.Random(5)
    pieces = WORDS + ["\n\n", "is 7", "é", "日本", ":", "Question"]
    completing = 0
    for _ in range(300):
        text = "".join(rng.choice(pieces) + rng.choice(["", " ", "\n"]) for _ in range(rng.randint(1, 12)))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = [i if rng.random() > 0.05 else rng.randrange(len(tokenizer)) for i in ids]  # some stray tokens
        for end in range(1, len(ids) + 1):
            before = tokenizer.decode(ids[:end - 1], skip_special_tokens=True)
            after = tokenizer.decode(ids[:end], skip_special_tokens=True)
            if any(s in after and s not in before for s in stop):
                completing += 1
                assert flags[ids[end - 1]], (ids[:end], after)
    assert completing > 50, "the sequences should complete stop strings often"
    assert generation._tokens_that_may_end_a_stop_string(tokenizer, ("Answer: ",)) is None


def test_falls_back_when_a_cache_layer_is_never_written(tokenizer, monkeypatch):
    """A config announcing more layers than the model runs (as with KV-sharing models): the preallocated path
    notices after its first forward call and the generic path decodes everything."""
    model = make_model("llama", len(tokenizer))
    model.config.num_hidden_layers = 3  # the cache gets 3 layers; the model has (and writes) 2
    fast = count_calls(monkeypatch, generation._SlotDecoder, "run")
    generic = count_calls(monkeypatch, generation._StreamDecoder, "run")
    prompts = prompts_of_many_lengths(3, seed=6)
    results = greedy_generate(model, tokenizer, prompts, GenerationSettings(max_new_tokens=6, batch_size=4))
    assert fast[0] == 1 and generic[0] == 1
    assert_same_as_generate(model, tokenizer, prompts, results, 6)


@pytest.mark.parametrize("hooked", [False, True])
def test_lean_step_decoding_matches_generate(tokenizer, monkeypatch, hooked):
    """Many prompts, small batch: refills, row moves and window moves, each step through the lean step (or,
    with a forward hook on an attention module, through the model's own forward, the hook seeing every step)."""
    model = make_model("llama", len(tokenizer))
    seen = []
    if hooked:
        model.model.layers[0].self_attn.register_forward_hook(lambda module, args, output: seen.append(1))
    lean = count_calls(monkeypatch, lean_decode.LeanDecodeStep, "logits")
    prompts = prompts_of_many_lengths(13, seed=7)
    results = greedy_generate(model, tokenizer, prompts, GenerationSettings(max_new_tokens=12, batch_size=4))
    assert (lean[0] == 0) == hooked and (len(seen) > 12) == hooked
    assert_same_as_generate(model, tokenizer, prompts, results, 12)
