"""Generated corpus, character vocabulary, nanoGPT data files, safe meta.pkl reading, batches."""

from __future__ import annotations

import pickle
import re

import numpy as np
import pytest
import torch

from adapprox_cli.errors import InputError
from adapprox_cli.train.corpus import generate_corpus
from adapprox_cli.train.data import (
    CharVocab,
    encode_text_file,
    get_batch,
    read_meta,
    read_nanogpt_dataset,
    read_tokens,
    read_vocab,
    write_meta,
    write_nanogpt_dataset,
    write_tokens,
)

# ---------------------------------------------------------------------------------------------
# corpus


def test_corpus_is_deterministic_per_seed_and_differs_across_seeds():
    assert generate_corpus(5000, seed=1) == generate_corpus(5000, seed=1)
    assert generate_corpus(5000, seed=1) != generate_corpus(5000, seed=2)
    # A shorter request is a prefix of a longer one: length only decides where to stop.
    assert generate_corpus(20_000, seed=1).startswith(generate_corpus(5000, seed=1))


@pytest.mark.parametrize("n_chars", [0, 1, 777, 10_000])
def test_corpus_has_the_requested_length(n_chars):
    assert len(generate_corpus(n_chars, seed=0)) == n_chars


def test_corpus_rejects_negative_length():
    with pytest.raises(ValueError, match="n_chars"):
        generate_corpus(-1, seed=0)


def test_corpus_has_checkable_structure():
    text = generate_corpus(100_000, seed=3)
    sums = re.findall(r"^(\d+) ([-+*]) (\d+) = (\d+)$", text, flags=re.MULTILINE)
    assert len(sums) > 50
    for a, op, b, result in sums:
        assert {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op] == int(result)
    counts = re.findall(r"counts: ([\d, ]+)\.", text)
    assert counts
    for run in counts:
        numbers = [int(n) for n in run.split(", ")]
        assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))
    # Every finished paragraph closes its quotes and parentheses.
    for paragraph in text.split("\n\n")[:-1]:
        assert paragraph.count('"') % 2 == 0
        assert paragraph.count("(") == paragraph.count(")")
    # A modest, fixed alphabet: a character model's vocabulary is small.
    assert 50 <= len(set(text)) <= 80


# ---------------------------------------------------------------------------------------------
# vocabulary


def test_vocab_follows_nanogpt_rule_and_round_trips():
    text = "hello, world!\n"
    vocab = CharVocab.from_text(text)
    assert list(vocab.stoi) == sorted(set(text))
    assert vocab.itos == {i: ch for ch, i in vocab.stoi.items()}
    assert vocab.decode(vocab.encode(text)) == text
    assert vocab.to_meta() == {"vocab_size": 11, "itos": vocab.itos, "stoi": vocab.stoi}


def test_encode_names_unknown_characters():
    vocab = CharVocab.from_text("abc")
    with pytest.raises(InputError, match=r"2 character\(s\).*'\\t', 'z'"):
        vocab.encode("ab\tz")


# ---------------------------------------------------------------------------------------------
# files


def test_dataset_files_have_nanogpt_layout(tmp_path):
    text = generate_corpus(2000, seed=0)
    vocab = write_nanogpt_dataset(tmp_path, text)
    ids = [vocab.stoi[ch] for ch in text]
    split = int(len(ids) * 0.9)
    # Exactly the bytes nanoGPT's prepare.py writes, and the dict it pickles.
    assert (tmp_path / "train.bin").read_bytes() == np.array(ids[:split], dtype=np.uint16).tobytes()
    assert (tmp_path / "val.bin").read_bytes() == np.array(ids[split:], dtype=np.uint16).tobytes()
    with open(tmp_path / "meta.pkl", "rb") as f:
        meta = pickle.load(f)  # our own file, written just above
    assert meta == {
        "vocab_size": len(set(text)),
        "itos": dict(enumerate(sorted(set(text)))),
        "stoi": vocab.stoi,
    }

    data = read_nanogpt_dataset(tmp_path)
    assert isinstance(data.train, np.memmap)
    assert data.train.dtype == np.uint16
    assert data.vocab == vocab
    assert vocab.decode(data.train) + vocab.decode(data.val) == text


def test_read_meta_accepts_a_nanogpt_meta_pickle(tmp_path):
    # As nanoGPT's prepare.py writes it: the default protocol, a plain dict.
    chars = sorted(set("some text"))
    meta = {
        "vocab_size": len(chars),
        "itos": dict(enumerate(chars)),
        "stoi": {ch: i for i, ch in enumerate(chars)},
    }
    for protocol in (2, pickle.DEFAULT_PROTOCOL, pickle.HIGHEST_PROTOCOL):
        path = tmp_path / f"meta{protocol}.pkl"
        path.write_bytes(pickle.dumps(meta, protocol=protocol))
        assert read_meta(path) == meta
        assert read_vocab(path).stoi == meta["stoi"]


def _evil_open(marker):
    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))  # pickled as io.open

    return Evil()


def _evil_exec(marker):
    class Evil:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').close()",))  # pickled as builtins.exec

    return Evil()


@pytest.mark.parametrize(
    ("make_evil", "global_name"), [(_evil_open, "io.open"), (_evil_exec, "builtins.exec")]
)
def test_restricted_unpickler_refuses_code_execution(tmp_path, make_evil, global_name):
    marker = tmp_path / "marker"
    path = tmp_path / "meta.pkl"
    path.write_bytes(pickle.dumps({"vocab_size": 2, "itos": make_evil(marker)}))
    with pytest.raises(InputError, match=re.escape(global_name)) as excinfo:
        read_meta(path)
    assert str(path) in str(excinfo.value)
    assert not marker.exists()
    with pytest.raises(InputError):
        read_vocab(path)
    assert not marker.exists()


def test_the_malicious_pickle_is_live_under_plain_pickle(tmp_path):
    # Shows the test above guards against something real: plain pickle.load runs the payload.
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(_evil_open(marker))).close()
    assert marker.exists()


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (pickle.dumps([1, 2, 3]), "holds a list"),
        (pickle.dumps({"vocab_size": 2}), "no character vocabulary"),
        (pickle.dumps({"vocab_size": 1, "stoi": {"ab": 0}, "itos": {0: "ab"}}), "single characters"),
        (pickle.dumps({"vocab_size": 2, "stoi": {"a": 0, "b": 1}, "itos": {0: "b", 1: "a"}}), "inverse"),
        (
            pickle.dumps({"vocab_size": 3, "stoi": {"a": 0, "b": 1}, "itos": {0: "a", 1: "b"}}),
            "vocab_size is 3",
        ),
        (b"\x80\x04garbage", "not a"),
        (b"", "not a"),
    ],
)
def test_read_vocab_rejects_bad_meta(tmp_path, payload, message):
    path = tmp_path / "meta.pkl"
    path.write_bytes(payload)
    with pytest.raises(InputError, match=message):
        read_vocab(path)


def test_read_meta_missing_file(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_meta(tmp_path / "meta.pkl")


def test_token_files_round_trip_and_validate(tmp_path):
    path = tmp_path / "train.bin"
    write_tokens(path, [0, 5, 65535])
    assert read_tokens(path).tolist() == [0, 5, 65535]
    with pytest.raises(InputError, match=r"token id 65535.*only 100 ids"):
        read_tokens(path, vocab_size=100)
    path.write_bytes(b"\x00\x01\x02")
    with pytest.raises(InputError, match="3 bytes"):
        read_tokens(path)
    path.write_bytes(b"")
    with pytest.raises(InputError, match="0 bytes"):
        read_tokens(path)
    with pytest.raises(InputError, match="no such file"):
        read_tokens(tmp_path / "missing.bin")
    with pytest.raises(ValueError, match=r"0\.\.65535"):
        write_tokens(path, [70_000])


def test_encode_text_file_with_a_checkpoint_vocab(tmp_path):
    vocab = CharVocab.from_text("abc \n")
    good = tmp_path / "good.txt"
    good.write_text("cab ab\n", encoding="utf-8")
    assert vocab.decode(encode_text_file(good, vocab)) == "cab ab\n"

    bad = tmp_path / "bad.txt"
    bad.write_text("abcé€\tab", encoding="utf-8")
    with pytest.raises(InputError) as excinfo:
        encode_text_file(bad, vocab)
    message = str(excinfo.value)
    assert str(bad) in message and "3 character(s)" in message
    assert all(repr(ch) in message for ch in "é€\t")
    assert "\n" not in message  # one line

    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café".encode("latin-1"))
    with pytest.raises(InputError, match="not UTF-8"):
        encode_text_file(latin1, vocab)


# ---------------------------------------------------------------------------------------------
# batches


def test_get_batch_shapes_and_shift():
    data = np.arange(1000, dtype=np.uint16)
    x, y = get_batch(data, block_size=8, batch_size=4, generator=torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 8)
    assert x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1)  # targets are the next tokens
    assert torch.equal(x[:, 1:], x[:, :-1] + 1)  # contiguous windows


def test_get_batch_is_deterministic_and_resumable():
    data = np.arange(5000, dtype=np.uint16)

    def batches(generator, n):
        return [get_batch(data, 16, 4, generator)[0] for _ in range(n)]

    first = batches(torch.Generator().manual_seed(42), 6)
    assert all(
        torch.equal(a, b) for a, b in zip(first, batches(torch.Generator().manual_seed(42), 6), strict=True)
    )
    assert not torch.equal(first[0], batches(torch.Generator().manual_seed(43), 1)[0])

    # Saving the generator state mid-run and restoring it continues the same sequence.
    generator = torch.Generator().manual_seed(42)
    batches(generator, 3)
    saved = generator.get_state()
    resumed = torch.Generator()
    resumed.set_state(saved)
    assert all(torch.equal(a, b) for a, b in zip(first[3:], batches(resumed, 3), strict=True))


def test_get_batch_needs_block_size_plus_one_tokens():
    generator = torch.Generator().manual_seed(0)
    x, _ = get_batch(np.arange(9, dtype=np.uint16), 8, 2, generator)
    assert torch.equal(x[0], torch.arange(8))
    with pytest.raises(InputError, match="8 tokens, too few for block_size 8"):
        get_batch(np.arange(8, dtype=np.uint16), 8, 2, generator)


def test_write_meta_is_byte_stable(tmp_path):
    vocab = CharVocab.from_text("stable bytes")
    write_meta(tmp_path / "a.pkl", vocab)
    write_meta(tmp_path / "b.pkl", CharVocab.from_text("bytes stable"))
    assert (tmp_path / "a.pkl").read_bytes() == (tmp_path / "b.pkl").read_bytes()
