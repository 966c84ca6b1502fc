"""Frozen T5 encoder loading: a tiny random checkpoint round-trips through transformers' real loaders."""
from __future__ import annotations

import pickle

import pytest
import torch

from pipeline.data.synthetic import COLOURS, POSITION_PHRASES, SHAPES, SIZES
from pipeline.errors import ConfigError
from pipeline.text.t5 import FrozenT5Encoder, T5EncoderConfig, write_tiny_t5

WORDS = [*COLOURS, *SHAPES, *SIZES, *" ".join(POSITION_PHRASES.values()).split(), "a", "and"]


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory):
    return write_tiny_t5(tmp_path_factory.mktemp("t5"), WORDS, d_model=32, layers=2, heads=2, seed=0)


def test_encode_shapes_mask_and_padding(tiny_t5):
    enc = FrozenT5Encoder(T5EncoderConfig(path=str(tiny_t5), max_length=20))
    captions = ["a large red circle on the left and a small blue square at the bottom", "a small cyan triangle"]
    emb, mask = enc.encode(captions)
    assert emb.shape == (2, 20, 32) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [16, 5]  # one piece per known word + </s>
    assert torch.all(emb[~mask] == 0) and torch.all(emb[mask].abs().sum(-1) > 0)
    # Same words in another caption give different contextual embeddings, same caption gives the same.
    again, _ = enc.encode(captions[:1])
    torch.testing.assert_close(again[0], emb[0])


def test_tokenizer_pickles_without_the_loaded_tokenizer(tiny_t5):
    enc = FrozenT5Encoder(T5EncoderConfig(path=str(tiny_t5), max_length=8))
    enc.tokenize(["warm up"])
    clone = pickle.loads(pickle.dumps(enc.tokenize))
    assert clone._tokenizer is None
    out = clone(["a red circle"])
    assert torch.equal(out["t5_ids"], enc.tokenize(["a red circle"])["t5_ids"]) and out["t5_ids"].shape == (1, 8)


def test_missing_checkpoint_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot load a T5 encoder"):
        FrozenT5Encoder(T5EncoderConfig(path=str(tmp_path / "nope")))
    with pytest.raises(ConfigError, match="path is empty"):
        FrozenT5Encoder(T5EncoderConfig(path=""))


def test_tiny_t5_needs_no_file_is_deterministic_and_leaves_the_rng_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = FrozenT5Encoder(T5EncoderConfig(path="tiny", max_length=12))
    assert torch.equal(torch.get_rng_state(), before)  # building it must not shift training randomness
    b = FrozenT5Encoder(T5EncoderConfig(path="tiny", max_length=12))
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    captions = ["a large red circle on the left", "zebra crossing 42 ünïcode"]  # unknown words: characters
    tokens = a.tokenize(captions)
    unk = a.tokenize._tokenizer.unk_token_id
    assert tokens["t5_mask"][0].sum() == 8 and not (tokens["t5_ids"][tokens["t5_mask"]] == unk).all()
    assert (tokens["t5_ids"][0][tokens["t5_mask"][0]] != unk).all()
    emb, mask = a.encode(captions)
    assert emb.shape == (2, 12, a.dim) and torch.all(emb[~mask] == 0)
    torch.testing.assert_close(emb, b.encode(captions)[0], rtol=0, atol=0)
