import pandas as pd
import pytest
from conftest import make_messages

from gpt2_classifier.data import balance, class_counts, parse_tsv, read_csv, split, write_csv
from gpt2_classifier.errors import DataError

LABELS = ["ham", "spam"]


def write(tmp_path, content: bytes):
    path = tmp_path / "messages.tsv"
    path.write_bytes(content)
    return path


def test_parse_keeps_quotes_inner_tabs_and_non_ascii(tmp_path):
    path = write(tmp_path, 'ham\tsay "hi" to "mum\nspam\tWIN\t£100 now\nham\tcafé ☕\n'.encode())
    frame = parse_tsv(path, LABELS)
    assert frame["text"].tolist() == ['say "hi" to "mum', "WIN\t£100 now", "café ☕"]
    assert frame["label"].tolist() == [0, 1, 0]


def test_parse_accepts_crlf_and_no_final_newline(tmp_path):
    frame = parse_tsv(write(tmp_path, b"ham\ta\r\nspam\tb"), LABELS)
    assert frame["text"].tolist() == ["a", "b"]


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
    assert frame["text"].tolist() == ["a", "b"] and frame["label"].tolist() == [0, 1]


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
    pd.testing.assert_frame_equal(first, again)
    assert set(first["line"]) != set(other["line"])  # the seed decides which ham is kept
    spam_lines = set(frame.loc[frame["label"] == 1, "line"])
    assert spam_lines <= set(first["line"])  # every message of the smallest class is kept


def test_balance_refuses_a_file_with_one_class(tmp_path):
    frame = parse_tsv(write(tmp_path, b"ham\ta\nham\tb\n"), LABELS)
    with pytest.raises(DataError, match=r"no messages labelled \['spam'\]"):
        balance(frame, LABELS, 123)


def test_split_fractions_reference_counts():
    frame = pd.DataFrame({"text": [f"m{i}" for i in range(1494)], "label": [i % 2 for i in range(1494)]})
    parts = split(frame, 0.7, 0.1, 0.2, seed=123)
    assert [len(parts[n]) for n in ("train", "validation", "test")] == [1045, 149, 300]
    assert sorted(pd.concat(parts.values())["text"]) == sorted(frame["text"])  # a partition: nothing lost or repeated


def test_split_below_one_leaves_the_rest_out_and_is_seeded():
    frame = pd.DataFrame({"text": [f"m{i}" for i in range(100)], "label": [0] * 100})
    parts = split(frame, 0.5, 0.1, 0.2, seed=1)
    assert [len(p) for p in parts.values()] == [50, 10, 20]
    assert parts["train"]["text"].tolist() == split(frame, 0.5, 0.1, 0.2, seed=1)["train"]["text"].tolist()
    assert parts["train"]["text"].tolist() != split(frame, 0.5, 0.1, 0.2, seed=2)["train"]["text"].tolist()


def test_csv_round_trip_keeps_awkward_text(tmp_path):
    frame = pd.DataFrame(
        {"text": ['a "quoted", comma', "tab\there", "NA", "  spaced  ", "ünï"], "label": [0, 1, 0, 1, 0]}
    )
    write_csv(frame, tmp_path / "f.csv")
    pd.testing.assert_frame_equal(read_csv(tmp_path / "f.csv"), frame)
