"""Vocabulary, tokenisation and caption augmentation."""

import torch

from maxmatch_cli.data.tokenizers import Vocab, corrupt_tokens, tokenize


def test_tokenize_lowercases_and_drops_punctuation():
    assert tokenize("A Red car, parked next-to a DOG.") == ["a", "red", "car", "parked", "next", "to", "a", "dog"]


def test_vocab_min_count_and_specials():
    caps = ["a dog runs"] * 4 + ["a cat sleeps"] * 3
    vocab = Vocab.build(caps, min_count=4)
    assert vocab.words[:4] == ["<pad>", "<start>", "<end>", "<unk>"]
    assert set(vocab.words[4:]) == {"a", "dog", "runs"}
    ids = vocab.encode("A cat runs", max_len=10)
    assert ids == [vocab.start_id, vocab.index["a"], vocab.unk_id, vocab.index["runs"], vocab.end_id]
    assert Vocab.from_json(vocab.to_json()).words == vocab.words
    assert len(vocab.encode("a " * 100, max_len=8)) == 8


def test_word_dropout_keeps_start_end():
    vocab = Vocab.build(["a dog runs fast"] * 4)
    ids = vocab.encode("a dog runs fast", 10)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        out = vocab.drop_tokens(ids, 0.5, g)
        assert out[0] == vocab.start_id and out[-1] == vocab.end_id
    assert vocab.drop_tokens(ids, 0.0, g) == ids


def test_caption_corruption_masks_half_replaces_a_tenth_and_deletes_the_rest():
    """VSE-infinity/DivE: a hit token becomes the mask (50%), a random token (10%) or is deleted (40%)."""
    ids = [1] + [7] * 20000 + [2]
    out = corrupt_tokens(ids, 1.0, torch.Generator().manual_seed(0), mask_id=3, random_range=(100, 200))
    assert out[0] == 1 and out[-1] == 2
    inner = out[1:-1]
    masked, randomised = inner.count(3), sum(100 <= t < 200 for t in inner)
    deleted = 20000 - len(inner)
    assert 7 not in inner  # rate 1: every inner token is hit
    for count, share in ((masked, 0.5), (randomised, 0.1), (deleted, 0.4)):
        assert abs(count / 20000 - share) < 0.015
    assert corrupt_tokens(ids[:5], 0.0, None, 3, (100, 200)) == ids[:5]
