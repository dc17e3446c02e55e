import hashlib
import shutil

import numpy as np
import pytest
import torch

from gpt2_classifier.core.errors import PipelineError
from gpt2_classifier.data.encode import load_split, pad, pad_encode
from gpt2_classifier.data.messages import Messages
from gpt2_classifier.data.tokenizer import END_OF_TEXT_ID, gpt2_encoding, packaged_bpe_dir


def test_offline_bpe_is_gpt2():
    enc = gpt2_encoding()
    # Token ids of the published GPT-2 vocabulary.
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.encode_ordinary(" the") == [262]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [END_OF_TEXT_ID]
    assert enc.n_vocab == 50257
    assert enc.decode(enc.encode_ordinary("Ünïcödé £100 \t tabs")) == "Ünïcödé £100 \t tabs"


def test_text_cannot_inject_the_special_token():
    from gpt2_classifier.data.encode import tokenize

    assert END_OF_TEXT_ID not in tokenize(["a <|endoftext|> b"])[0]


def test_bpe_files_with_wrong_hash_are_refused(tmp_path):
    for name in ("vocab.bpe", "encoder.json"):
        shutil.copy(packaged_bpe_dir() / name, tmp_path / name)
    with open(tmp_path / "vocab.bpe", "a") as f:
        f.write("x y\n")
    with pytest.raises(PipelineError, match=r"vocab.bpe: SHA-256 [0-9a-f]{64} is not GPT-2's 1ce16647"):
        gpt2_encoding(tmp_path)
    assert hashlib.sha256((packaged_bpe_dir() / "vocab.bpe").read_bytes()).hexdigest().startswith("1ce16647")


def test_pad_truncates_and_records_lengths():
    split = pad([[1, 2, 3], [4], [5, 6, 7, 8, 9]], [0, 1, 0], max_length=4, truncate="head")
    assert split.input_ids.tolist() == [[1, 2, 3, END_OF_TEXT_ID], [4] + [END_OF_TEXT_ID] * 3, [5, 6, 7, 8]]
    assert split.lengths.tolist() == [3, 1, 4]
    assert split.labels.tolist() == [0, 1, 0]


def messages(texts, labels):
    return Messages(texts, np.array(labels), np.arange(1, len(texts) + 1))


def frames():
    return {
        "train": messages(["one two three four", "hi"], [0, 1]),
        "validation": messages(["a much longer validation message than any training one"], [1]),
        "test": messages(["short"], [0]),
    }


def test_pads_every_split_to_the_longest_training_sequence():
    encoded, meta = pad_encode(frames(), ["ham", "spam"], "longest", 1024, "head")
    assert meta.max_length == meta.longest_train == 4
    assert {name: tuple(s.input_ids.shape) for name, s in encoded.items()} == {
        "train": (2, 4), "validation": (1, 4), "test": (1, 4)
    }  # fmt: skip
    assert meta.splits["validation"].truncated == 1
    assert (encoded["train"].input_ids[1, 1:] == END_OF_TEXT_ID).all()


def test_fixed_length_and_safetensors_round_trip(tmp_path):
    encoded, meta = pad_encode(frames(), ["ham", "spam"], 16, 1024, "head")
    assert meta.max_length == 16 and encoded["test"].input_ids.shape == (1, 16)
    encoded["train"].save(tmp_path / "train.safetensors")
    loaded = load_split(tmp_path / "train.safetensors")
    assert torch.equal(loaded.input_ids, torch.from_numpy(encoded["train"].input_ids))
    assert torch.equal(loaded.lengths, torch.from_numpy(encoded["train"].lengths))
