"""Tiny models and tokenizers built locally, for tests, demos and benchmarks (nothing is downloaded).

``make_tokenizer`` builds a byte-level BPE tokenizer (optionally trained on a small corpus, deterministic);
``make_model`` builds a randomly initialised causal LM of a given architecture from a tiny config;
``make_family`` writes a base model and fine-tune-like variants (base + small seeded perturbations) as
Hugging Face checkpoint folders that share the base, which is what merging needs.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]

_ARCH_CONFIGS = {  # tiny name: (config class, model class)
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM"),
    "phi": ("PhiConfig", "PhiForCausalLM"),  # Phi-2 style: model.final_layernorm, partial rotary
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM"),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel"),
    "falcon": ("FalconConfig", "FalconForCausalLM"),
}
_TIED_BY_DEFAULT = {"gpt2"}
_WITH_HEAD_DIM = {"qwen3", "gemma2", "gemma3"}  # their default head_dim (128, 256) ignores hidden_size


def _arch_kwargs(arch: str, c: dict) -> dict:
    """The config keyword arguments of one architecture from the common tiny sizes ``c``."""
    if arch == "gpt2":
        return dict(n_embd=c["hidden_size"], n_layer=c["num_layers"], n_head=c["num_heads"],
                    n_inner=c["intermediate_size"], n_positions=c["max_position_embeddings"])
    common = dict(hidden_size=c["hidden_size"], num_hidden_layers=c["num_layers"],
                  num_attention_heads=c["num_heads"], max_position_embeddings=c["max_position_embeddings"])
    if arch == "falcon":
        return dict(common, num_kv_heads=c["num_kv_heads"], new_decoder_architecture=True)
    common["intermediate_size"] = c["intermediate_size"]
    if arch == "gpt_neox":
        return dict(common, rotary_pct=0.5)
    common["num_key_value_heads"] = c["num_kv_heads"]
    if arch == "phi":
        return dict(common, partial_rotary_factor=0.5)
    if arch in _WITH_HEAD_DIM:
        common["head_dim"] = c["hidden_size"] // c["num_heads"]
    if arch in ("gemma2", "gemma3"):  # alternate sliding and full attention, with a window tests can reach
        common.update(sliding_window=6, layer_types=[("sliding_attention", "full_attention")[i % 2]
                                                     for i in range(c["num_layers"])])
    return common


def make_tokenizer(corpus: list[str] | None = None, vocab_size: int = 512):
    """A byte-level BPE tokenizer: pure bytes (259 tokens + specials) or trained on ``corpus``."""
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size if corpus else 0,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus or [""], trainer=trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="left",
    )


def make_config(arch: str = "llama", vocab_size: int = 300, hidden_size: int = 64, num_layers: int = 4,
                num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int = 128,
                max_position_embeddings: int = 512, tie_word_embeddings: bool | None = None, **extra):
    """A tiny config of ``arch`` (see ``_ARCH_CONFIGS``); ``tie_word_embeddings`` None: untied, except GPT-2."""
    if arch not in _ARCH_CONFIGS:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose from {sorted(_ARCH_CONFIGS)}")
    config_cls = getattr(transformers, _ARCH_CONFIGS[arch][0])
    sizes = dict(hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
                 intermediate_size=intermediate_size, max_position_embeddings=max_position_embeddings)
    tied = arch in _TIED_BY_DEFAULT if tie_word_embeddings is None else tie_word_embeddings
    kwargs = dict(_arch_kwargs(arch, sizes), vocab_size=vocab_size, tie_word_embeddings=tied, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2)
    return config_cls(**dict(kwargs, **extra))


def make_model(arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **config_kwargs):
    """A randomly initialised causal LM (seeded) from a tiny config."""
    config = make_config(arch, **config_kwargs)
    model_cls = getattr(transformers, _ARCH_CONFIGS[arch][1])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    return model.to(dtype).eval()


def perturb_(model, scale: float, seed: int) -> None:
    """Add seeded Gaussian noise (relative to each tensor's std) to every parameter, in place."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            std = float(p.float().std()) if p.numel() > 1 else 1.0
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32) * (scale * (std or 1.0))
            p.add_(noise.to(p.dtype))


def make_family(out_dir: str | Path, n_variants: int = 2, arch: str = "llama", seed: int = 0,
                scale: float = 0.05, tokenizer=None, dtype: torch.dtype = torch.float32,
                max_shard_size: str | int = "5GB", **config_kwargs) -> dict[str, Path]:
    """Write ``base`` and ``model_1..n`` checkpoint folders under ``out_dir``; returns their paths.

    Variants are the base plus seeded noise, so task vectors are small and merges are meaningful.
    """
    out = Path(out_dir)
    tok = tokenizer if tokenizer is not None else make_tokenizer()
    config_kwargs.setdefault("vocab_size", len(tok))
    base = make_model(arch, seed=seed, dtype=dtype, **config_kwargs)
    paths: dict[str, Path] = {}
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    for i in range(n_variants + 1):
        name = "base" if i == 0 else f"model_{i}"
        base.load_state_dict(base_state)
        if i:
            perturb_(base, scale, seed=seed * 1000 + i)
        path = out / name
        base.save_pretrained(path, max_shard_size=max_shard_size)
        tok.save_pretrained(path)
        paths[name] = path
    return paths


def train_causal_lm(model, encoded: list[list[int]], pad_token_id: int, steps: int, batch_size: int,
                    lr: float, rng, weight_decay: float = 0.01, log=None):
    """Train ``model`` in place on token sequences with next-token loss (AdamW, right padding ignored by the
    loss); batches are drawn with ``rng`` (a ``random.Random``) so a seeded run is reproducible.
    ``log(step, loss)`` is called after each step when given. Returns the model, in train mode."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    for step in range(steps):
        batch = rng.sample(encoded, batch_size)
        width = max(len(x) for x in batch)
        ids = torch.full((len(batch), width), pad_token_id)
        labels = torch.full((len(batch), width), -100)
        for row, seq in enumerate(batch):
            ids[row, :len(seq)] = torch.tensor(seq)
            labels[row, :len(seq)] = torch.tensor(seq)
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if log is not None:
            log(step, loss.item())
    return model
