"""Frozen T5 encoder and its tokenizer, loaded with transformers from a local directory or a hub name.

Real runs point `path` at a T5 (v1.1 / flan) checkpoint directory or hub id such as ``google/t5-v1_1-xxl``.
``path: tiny`` builds a tiny random encoder in memory, needing no file: a fixed word-level Unigram vocabulary
(the synthetic dataset's words and common English words, pipeline.data.synthetic.caption_words, with single
characters as fallback so any caption tokenizes) and weights drawn from a fixed seed, identical in every process. :func:`write_tiny_t5` writes the same
kind of model to a folder that transformers' own loaders read (tests of the real loading path, precompute).

Shapes: captions list[str] (B) -> input_ids int64 (B, L), attention_mask bool (B, L) (True = real token),
embeddings (B, L, d_model) with padded positions zeroed.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline.config_schema import check, doc
from pipeline.data.synthetic import caption_words
from pipeline.errors import CheckpointError, ConfigError


@dataclass(frozen=True)
class T5EncoderConfig:
    """Which frozen T5 encoder conditions a stage."""

    path: str = doc("", "Local directory (config.json, weights, tokenizer files) or hub id of a T5 encoder "
                        "(e.g. google/t5-v1_1-xxl, google/flan-t5-xl); 'tiny' builds a tiny random T5 in memory "
                        "from a fixed vocabulary and seed (tests, CPU demo).")
    max_length: int = doc(64, "Tokens per caption (truncated / padded to this length).")

    def __post_init__(self) -> None:
        check(self.max_length > 0, "max_length", f"must be > 0, got {self.max_length}")


TINY = "tiny"
TINY_SEED = 0
TINY_DIMS = {"d_model": 32, "layers": 2, "heads": 2}
def tiny_tokenizer(words: Iterable[str]):
    """A T5 tokenizer whose Unigram vocabulary holds T5's special tokens, one '▁word' piece per word and single
    characters as fallback (so any caption tokenizes without unknown tokens)."""
    from transformers import T5Tokenizer

    pieces = sorted({w.lower() for w in words})
    chars = sorted({c for w in pieces for c in w} | set("abcdefghijklmnopqrstuvwxyz0123456789"))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(f"▁{w}", -1.0) for w in pieces] + [(c, -5.0) for c in chars] + [(f"▁{c}", -6.0) for c in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def tiny_encoder(vocab_size: int, *, d_model: int, layers: int, heads: int, seed: int):
    """A random T5EncoderModel drawn from `seed` without touching the caller's RNG streams (same weights in every
    process, and training randomness is not shifted by building it)."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=d_model // heads, d_ff=2 * d_model,
                      num_layers=layers, num_heads=heads, feed_forward_proj="gated-gelu", is_encoder_decoder=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return T5EncoderModel(config).eval()


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    if path == TINY:
        return tiny_tokenizer(caption_words())
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load a T5 tokenizer from {path!r}: {str(exc).splitlines()[0]}") from None


class T5Tokenize:
    """Batched tokenizer for loader workers: list[str] -> {"t5_ids": (B, L) int64, "t5_mask": (B, L) bool}.

    Holds only the path and loads the tokenizer lazily, so it pickles cheaply into worker processes.
    """

    def __init__(self, path: str, max_length: int) -> None:
        self.path, self.max_length = path, max_length
        self._tokenizer = None

    def __getstate__(self) -> dict:
        return {"path": self.path, "max_length": self.max_length, "_tokenizer": None}

    def __call__(self, captions: list[str]) -> dict[str, torch.Tensor]:
        if self._tokenizer is None:
            self._tokenizer = _load_tokenizer(self.path)
        out = self._tokenizer(list(captions), max_length=self.max_length, padding="max_length", truncation=True,
                              return_tensors="pt")
        return {"t5_ids": out["input_ids"].long(), "t5_mask": out["attention_mask"].bool()}


class FrozenT5Encoder(nn.Module):
    """A T5 encoder used as a frozen feature extractor (the Trainer freezes and casts it)."""

    def __init__(self, cfg: T5EncoderConfig, strict: bool = False) -> None:
        super().__init__()
        from transformers import T5EncoderModel

        if not cfg.path:
            raise ConfigError("T5 encoder path is empty: set it to a T5 checkpoint directory, a hub id or 'tiny'")
        if cfg.path == TINY:
            self.encoder = tiny_encoder(len(_load_tokenizer(TINY)), seed=TINY_SEED, **TINY_DIMS)
        else:
            try:
                self.encoder, info = T5EncoderModel.from_pretrained(cfg.path, output_loading_info=True)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"cannot load a T5 encoder from {cfg.path!r}: {str(exc).splitlines()[0]}") from None
            wrong = {k: sorted(v)[:5] for k, v in info.items() if k != "error_msgs" and v}
            if strict and wrong:  # transformers initialises missing weights at random, with only a warning
                raise CheckpointError(f"{cfg.path}: the T5 weights do not match its config.json ({wrong})")
        self.tokenize = T5Tokenize(cfg.path, cfg.max_length)
        self.dim = int(self.encoder.config.d_model)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) ids and bool mask -> (B, L, d_model) embeddings, zero at padded positions."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask.long()).last_hidden_state
        return hidden * attention_mask[..., None].to(hidden.dtype)

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> (embeddings (B, L, D), mask (B, L) bool) on the encoder's device."""
        tokens = self.tokenize(captions)
        device = next(self.encoder.parameters()).device
        mask = tokens["t5_mask"].to(device)
        return self.forward(tokens["t5_ids"].to(device), mask), mask


def save_t5(cfg: T5EncoderConfig, out_dir: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """The encoder of `cfg` (tiny, local or hub) as a transformers ``save_pretrained`` folder with its tokenizer
    (safetensors), which ``T5EncoderModel.from_pretrained`` and ``AutoTokenizer.from_pretrained`` load."""
    out = Path(out_dir)
    encoder = FrozenT5Encoder(cfg).encoder.to(dtype)
    encoder.save_pretrained(out, safe_serialization=True)
    _load_tokenizer(cfg.path).save_pretrained(out)
    return out


def write_tiny_t5(out_dir: str | Path, words: Iterable[str], *, d_model: int = 32, layers: int = 2, heads: int = 2,
                  seed: int = 0) -> Path:
    """Write a tiny random T5 encoder + word-level T5 tokenizer that `FrozenT5Encoder` loads from the folder
    (tests of the real loading path, precompute); see :func:`tiny_tokenizer` for the vocabulary."""
    out = Path(out_dir)
    tokenizer = tiny_tokenizer(words)
    tiny_encoder(len(tokenizer), d_model=d_model, layers=layers, heads=heads, seed=seed).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
