import numpy as np
import pandas as pd
import pytest
from conftest import make_messages

from gpt2_classifier.core.errors import DataError
from gpt2_classifier.data.messages import Messages, balance, class_counts, read_csv, split, write_csv
from gpt2_classifier.data.readers import parse_tsv

LABELS = ["ham", "spam"]


def write(tmp_path, content: bytes):
    path = tmp_path / "messages.tsv"
    path.write_bytes(content)
    return path


def test_parse_keeps_quotes_inner_tabs_and_non_ascii(tmp_path):
    path = write(tmp_path, 'ham\tsay "hi" to "mum\nspam\tWIN\t£100 now\nham\tcafé ☕\n'.encode())
    frame = parse_tsv(path, LABELS)
    assert frame.texts == ['say "hi" to "mum', "WIN\t£100 now", "café ☕"]
    assert frame.labels.tolist() == [0, 1, 0]


def test_parse_accepts_crlf_and_no_final_newline(tmp_path):
    frame = parse_tsv(write(tmp_path, b"ham\ta\r\nspam\tb"), LABELS)
    assert frame.texts == ["a", "b"]


@pytest.mark.parametrize(
    "content",
    [
        b"\xef\xbb\xbfham\ta\nspam\tb\n",
        b"ham\ta\nspam\tb\n\n",
        b"ham\ta\r\nspam\tb\r\n\r\n  \r\n",
        b"ham\ta\rspam\tb\r",
    ],
    ids=["utf-8 byte-order mark", "blank line at the end", "blank CRLF lines at the end", "old Mac CR-only"],
)
def test_parse_reads_files_as_editors_save_them(tmp_path, content):
    frame = parse_tsv(write(tmp_path, content), LABELS)
    assert frame.texts == ["a", "b"] and frame.labels.tolist() == [0, 1]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"ham\tok\nspam no tab here\n", "messages.tsv:2: no tab"),
        (b"ham\tok\nspam\tok\neggs\tok\n", "messages.tsv:3: unknown label 'eggs'"),
        (b"ham\tok\nspam\t  \n", "messages.tsv:2: empty message text"),
        (b"ham\tok\nspam\t\xff\xfe bad\n", "messages.tsv:2: not valid UTF-8"),
        (b"ham\tok\n\nspam\tok\n", "messages.tsv:2: blank line"),
        (b"", "the file is empty"),
    ],
)
def test_parse_rejects_malformed_lines_with_their_number(tmp_path, content, message):
    with pytest.raises(DataError, match=message):
        parse_tsv(write(tmp_path, content), LABELS)


def test_parse_counts_test_made_messages(tmp_path):
    frame = parse_tsv(write(tmp_path, make_messages(60, 20)), LABELS)
    assert class_counts(frame, LABELS) == {"ham": 60, "spam": 20}


def test_balance_undersamples_to_smallest_class_reproducibly(tmp_path):
    frame = parse_tsv(write(tmp_path, make_messages(60, 20)), LABELS)
    first, again, other = balance(frame, LABELS, 123), balance(frame, LABELS, 123), balance(frame, LABELS, 7)
    assert class_counts(first, LABELS) == {"ham": 20, "spam": 20}
    assert first.texts == again.texts and first.lines.tolist() == again.lines.tolist()
    assert set(first.lines) != set(other.lines)  # the seed decides which ham is kept
    spam_lines = set(frame.lines[frame.labels == 1])
    assert spam_lines <= set(first.lines)  # every message of the smallest class is kept


def messages(n: int, labels=None) -> Messages:
    labels = [i % 2 for i in range(n)] if labels is None else labels
    return Messages([f"m{i}" for i in range(n)], np.array(labels, dtype=np.int64), np.arange(1, n + 1))


def test_balance_and_split_pick_the_rows_pandas_sample_picks(tmp_path):
    # The reference balances with df.sample(n, random_state=123) and shuffles with df.sample(frac=1, ...):
    # the same rows in the same order, without pandas (it costs the data stages a second to import).
    frame = parse_tsv(write(tmp_path, make_messages(90, 25)), LABELS)
    df = pd.DataFrame({"text": frame.texts, "label": frame.labels})
    ham = df[df["label"] == 0].sample(25, random_state=123)
    expected = pd.concat([ham, df[df["label"] == 1]]).sample(frac=1, random_state=123)
    parts = split(balance(frame, LABELS, 123), 0.7, 0.1, 0.2, seed=123)
    assert [t for name in ("train", "validation", "test") for t in parts[name].texts] == expected["text"].tolist()


def test_balance_refuses_a_file_with_one_class(tmp_path):
    frame = parse_tsv(write(tmp_path, b"ham\ta\nham\tb\n"), LABELS)
    with pytest.raises(DataError, match=r"no messages labelled \['spam'\]"):
        balance(frame, LABELS, 123)


def test_split_fractions_reference_counts():
    frame = messages(1494)
    parts = split(frame, 0.7, 0.1, 0.2, seed=123)
    assert [len(parts[n]) for n in ("train", "validation", "test")] == [1045, 149, 300]
    assert sorted(t for p in parts.values() for t in p.texts) == sorted(frame.texts)  # nothing lost or repeated


def test_split_below_one_leaves_the_rest_out_and_is_seeded():
    frame = messages(100, [0] * 100)
    parts = split(frame, 0.5, 0.1, 0.2, seed=1)
    assert [len(p) for p in parts.values()] == [50, 10, 20]
    assert parts["train"].texts == split(frame, 0.5, 0.1, 0.2, seed=1)["train"].texts
    assert parts["train"].texts != split(frame, 0.5, 0.1, 0.2, seed=2)["train"].texts


def test_csv_round_trip_keeps_awkward_text(tmp_path):
    texts = ['a "quoted", comma', "tab\there", "NA", "  spaced  ", "ünï", "two\nlines\r\nand CR\r"]
    frame = Messages(texts, np.array([0, 1, 0, 1, 0, 1]), np.array([3, 5, 7, 9, 11, 13]))
    write_csv(frame, tmp_path / "f.csv")
    back = read_csv(tmp_path / "f.csv")
    assert back.texts == texts and back.labels.tolist() == [0, 1, 0, 1, 0, 1]
    assert back.lines.tolist() == frame.lines.tolist()
    # byte for byte what pandas writes, so the files (and their DVC hashes) are those of the reference's tools
    pd.DataFrame({"text": texts, "label": frame.labels, "line": frame.lines}).to_csv(
        tmp_path / "pandas.csv", index=False, lineterminator="\n"
    )
    assert (tmp_path / "f.csv").read_bytes() == (tmp_path / "pandas.csv").read_bytes()
