"""Your own data: every data.format read the same, archives read in place and bounded, one-line errors
naming the user's file and row, N classes through split, padding and metrics."""

import io
import json
import os
import tarfile
from typing import get_args

import numpy as np
import pytest
import torch
import yaml
from conftest import PROJECT, zip_bytes

from gpt2_classifier.core.errors import DataError, DownloadError, ParamsError
from gpt2_classifier.core.params import DataFormat, DataParams, parse_params
from gpt2_classifier.data.download import fetch_data_file
from gpt2_classifier.data.encode import pad, pad_encode
from gpt2_classifier.data.messages import Messages, balance, split
from gpt2_classifier.data.readers import READERS, data_name, number_labels, read_labelled
from gpt2_classifier.metrics.classification import per_class_report
from gpt2_classifier.train.loop import class_weights

ROWS = [(f'order {i}, "late", café\nline two' if i % 5 == 0 else f"text {i}", ("billing", "shipping", "refund")[i % 3])
        for i in range(30)]  # fmt: skip


def csv_bytes(rows, delimiter=",", text="text", label="label") -> bytes:
    import csv

    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=delimiter, lineterminator="\n")
    writer.writerow(["id", label, text])
    writer.writerows([i, lab, t] for i, (t, lab) in enumerate(rows))
    return buffer.getvalue().encode()


def jsonl_bytes(rows) -> bytes:
    return "".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in rows).encode()


def parquet_bytes(rows) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.table({"text": [t for t, _ in rows], "label": [lab for _, lab in rows]}), buffer)
    return buffer.getvalue()


def tar_gz(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def folder_members(rows, top="data/train") -> dict[str, bytes]:
    members = {f"{top}/{lab}/{i:03d}.txt": t.encode() for i, (t, lab) in enumerate(rows)}
    return members | {f"{top}/urls.txt": b"not a text", f"{top}/unsup/900.txt": b"no label", "data/README": b"about"}


def write(tmp_path, name, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def fetch(source, member, dest, **data):
    """fetch_data_file from one local source, not checked by hash."""
    return fetch_data_file(DataParams(url=str(source), member=member, retries=0, **data), dest)


def read(path, **data):
    params = DataParams(url=str(path), **data)
    return read_labelled(path, params, None, 1 << 20)


def test_a_folder_of_your_own_is_packed_the_same_wherever_it_is_and_read_as_its_archive(tmp_path):
    members = folder_members(ROWS)
    for root in ("a", "b"):
        for name, data in members.items():
            (tmp_path / root / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / root / name).write_bytes(data)
    (tmp_path / "b" / "data" / "train" / "billing" / "link.txt").symlink_to(
        tmp_path / "b" / "data" / "train" / "urls.txt"
    )
    os.utime(tmp_path / "b" / "data" / "train" / "billing" / "003.txt", (0, 0))  # another time, same text
    for root in ("a", "b"):
        fetch(tmp_path / root, "data/train", tmp_path / f"raw-{root}", format="folders")
    assert (tmp_path / "raw-a").read_bytes() == (tmp_path / "raw-b").read_bytes()  # the texts only: one hash
    params = DataParams(url=str(tmp_path / "a"), format="folders", member="data/train")
    texts = read_labelled(tmp_path / "raw-a", params, ["billing", "refund", "shipping"], 1 << 20)
    archive = write(tmp_path, "d.tar.gz", tar_gz(members))
    assert texts == read_labelled(archive, params, ["billing", "refund", "shipping"], 1 << 20)
    with pytest.raises(DownloadError, match=rf"{tmp_path / 'a'}: its files are larger than data.max_unzipped_mb"):
        fetch(tmp_path / "a", "data/train", tmp_path / "raw-d", format="folders", max_unzipped_mb=100 / 2**20)
    with pytest.raises(DownloadError, match="a folder; give the zip or the data file itself"):
        fetch(tmp_path / "a", "data/train", tmp_path / "raw-c", format="csv")


@pytest.mark.parametrize(
    ("name", "content", "data"),
    [
        ("d.csv", lambda: csv_bytes(ROWS), {"format": "csv"}),
        ("d.tsv", lambda: csv_bytes(ROWS, "\t"), {"format": "tsv"}),
        ("d.jsonl", lambda: jsonl_bytes(ROWS), {"format": "jsonl"}),
        ("d.parquet", lambda: parquet_bytes(ROWS), {"format": "parquet"}),
        (
            "d.csv",
            lambda: csv_bytes(ROWS, text="body", label="intent"),
            {"format": "csv", "text_column": "body", "label_column": "intent"},
        ),
    ],  # fmt: skip
    ids=["csv", "tsv", "jsonl", "parquet", "csv with other column names"],
)
def test_every_tabular_format_reads_the_same_texts_and_labels(tmp_path, name, content, data):
    texts = read(write(tmp_path, name, content()), **data)
    assert texts.texts == [t for t, _ in ROWS] and texts.labels == [lab for _, lab in ROWS]
    messages, labels = number_labels(texts, None)
    assert labels == ["billing", "refund", "shipping"]  # sorted from the data
    assert messages.labels.tolist() == [labels.index(lab) for _, lab in ROWS]


def test_folders_in_a_tar_gz_and_a_zip_read_each_label_folder(tmp_path):
    members = folder_members(ROWS)
    for archive in (write(tmp_path, "d.tar.gz", tar_gz(members)), write(tmp_path, "d.zip", zip_bytes(members))):
        params = DataParams(url=str(archive), format="folders", member="data/train")
        texts = read_labelled(archive, params, ["billing", "refund", "shipping"], 1 << 20)
        assert sorted(zip(texts.texts, texts.labels, strict=True)) == sorted(ROWS)
        assert texts.left_out == {"unsup": 1}  # a folder balance.labels does not name; urls.txt is no label's
        everything = read_labelled(archive, params, None, 1 << 20)
        assert set(everything.labels) == {"billing", "refund", "shipping", "unsup"}
        with pytest.raises(DataError, match=r"over data.max_unzipped_mb \(all texts together\)"):
            read_labelled(archive, params, None, 200)  # every text counts against the bound


def test_download_keeps_a_folders_archive_and_extracts_a_file_from_a_tar_gz(tmp_path):
    archive = write(tmp_path, "reviews.tar.gz", tar_gz(folder_members(ROWS)))
    fetch(archive, "data/train", tmp_path / "raw", format="folders")
    assert (tmp_path / "raw").read_bytes() == archive.read_bytes()
    with pytest.raises(DownloadError, match="no folder of .txt files inside 'data/test'"):
        fetch(archive, "data/test", tmp_path / "raw2", format="folders")
    data = csv_bytes(ROWS)
    packed = write(tmp_path, "t.tar.gz", tar_gz({"export/intents.csv": data, "export/notes.txt": b"x"}))
    fetch(packed, "intents.csv", tmp_path / "one")
    assert (tmp_path / "one").read_bytes() == data
    with pytest.raises(DownloadError, match="holds 2 files"):
        fetch(packed, None, tmp_path / "none")


def acl_imdb(seed=0) -> dict[str, bytes]:
    """The layout of aclImdb_v1.tar.gz, small, in a shuffled archive order: train/{neg,pos,unsup} and
    test/{neg,pos}, files named as there (`<id>_<rating>.txt`: `10_2.txt` sorts before `2_9.txt`)."""
    rng = np.random.default_rng(seed)
    members = {}
    for part, n in (("train", 6), ("test", 4)):
        for label in ("neg", "pos"):
            for i in range(n * 2 if part == "train" else n):
                rating = i % 4 + (1 if label == "neg" else 7)
                members[f"aclImdb/{part}/{label}/{i}_{rating}.txt"] = f"{part} {label} {i}".encode()
        members[f"aclImdb/{part}/urls_pos.txt"] = b"http://www.imdb.com/title/tt0000001/usercomments"
    members |= {f"aclImdb/train/unsup/{i}_0.txt": b"unlabelled" for i in range(3)}
    members["aclImdb/README"] = b"Large Movie Review Dataset v1.0"
    names = list(members)
    return {names[i]: members[names[i]] for i in rng.permutation(len(names))}


def labelled(members, part) -> list[str]:
    """A folder's labelled texts by path: the order data.format folders reads them in."""
    return sorted(n for n in members if n.startswith(f"aclImdb/{part}/") and n.split("/")[2] in ("neg", "pos"))


def test_listed_folders_are_pooled_in_the_listed_order_each_by_path(tmp_path):
    members = acl_imdb()
    assert [len(labelled(members, part)) for part in ("train", "test")] == [24, 8]
    for archive in (
        write(tmp_path, "aclImdb_v1.tar.gz", tar_gz(members)),
        write(tmp_path, "a.zip", zip_bytes(members)),
    ):
        for member, order in [
            (["aclImdb/train", "aclImdb/test"], labelled(members, "train") + labelled(members, "test")),
            (["aclImdb/test/", "aclImdb/train"], labelled(members, "test") + labelled(members, "train")),
            ("aclImdb/train", labelled(members, "train")),  # one folder, as before
        ]:
            params = DataParams(url=str(archive), format="folders", member=member)
            texts = read_labelled(archive, params, ["neg", "pos"], 1 << 20)
            assert texts.places == [f"{archive.name}: {name}" for name in order], member
            assert texts.texts == [members[name].decode() for name in order]
            assert texts.labels == [name.split("/")[2] for name in order]
            assert texts.left_out == {"unsup": 3}  # train/unsup: balance.labels names neg and pos only
    assert order[:3] == ["aclImdb/train/neg/0_1.txt", "aclImdb/train/neg/10_3.txt", "aclImdb/train/neg/11_4.txt"]


def test_pooled_folders_split_by_the_fractions_and_all_50000_reviews_give_the_bonus_sizes(tmp_path):
    members = acl_imdb()
    archive = write(tmp_path, "aclImdb_v1.tar.gz", tar_gz(members))
    params = DataParams(url=str(archive), format="folders", member=["aclImdb/train", "aclImdb/test"])
    pooled, labels = number_labels(read_labelled(archive, params, ["neg", "pos"], 1 << 20), ["neg", "pos"])
    assert len(pooled) == 32 and np.bincount(pooled.labels).tolist() == [16, 16]
    assert len(balance(pooled, labels, seed=123)) == 32  # equal classes: undersampling keeps every review
    parts = split(pooled, 0.7, 0.1, 0.2, seed=123)
    assert [len(parts[s]) for s in ("train", "validation", "test")] == [22, 3, 7]  # int(32 * .7), int(3.2), the rest
    assert sorted(t for part in parts.values() for t in part.texts) == sorted(pooled.texts)
    # the real archive's 25,000 neg and 25,000 pos: the bonus's 35,000 / 5,000 / 10,000
    reviews = messages([0] * 25_000 + [1] * 25_000)
    assert len(balance(reviews, ["neg", "pos"], seed=123)) == 50_000
    parts = split(reviews, 0.7, 0.1, 0.2, seed=123)
    assert [len(parts[s]) for s in ("train", "validation", "test")] == [35_000, 5_000, 10_000]


def test_download_checks_every_listed_folder(tmp_path):
    archive = write(tmp_path, "aclImdb_v1.tar.gz", tar_gz(acl_imdb()))
    fetch(archive, ["aclImdb/train", "aclImdb/test"], tmp_path / "raw", format="folders")
    assert (tmp_path / "raw").read_bytes() == archive.read_bytes()
    with pytest.raises(DownloadError) as info:
        fetch(archive, ["aclImdb/train", "aclImdb/dev"], tmp_path / "raw2", format="folders")
    assert str(info.value) == (
        f"could not get the folders of 'aclImdb/train', 'aclImdb/dev' from {archive} ({archive}: no folder of "
        ".txt files inside 'aclImdb/dev' (data.member); data.format folders expects <data.member>/<label>/<name>.txt)."
    )
    assert not (tmp_path / "raw2").exists()


def test_every_example_experiment_is_valid_params_and_imdb_is_the_bonus_recipe():
    base = yaml.safe_load((PROJECT / "params.yaml").read_text())
    examples = {p.stem: yaml.safe_load(p.read_text()) for p in sorted((PROJECT / "experiments").glob("*.yaml"))}
    resolved = {}
    for name, example in examples.items():
        if "set" not in example:
            continue  # reference_rows.yaml: rows, checked in test_variants.py
        params = yaml.safe_load(yaml.safe_dump(base))
        for key, value in example["set"].items():
            *parents, leaf = key.split(".")
            node = params
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        resolved[name] = parse_params(params, f"{name}.yaml")
    assert set(resolved) == {"imdb", "intents"}
    imdb = resolved["imdb"]
    assert (imdb.data.format, imdb.data.members) == ("folders", ["aclImdb/train", "aclImdb/test"])
    assert imdb.data.max_unzipped_bytes > 66 * 10**6  # the 50,000 labelled reviews' text
    assert (imdb.balance.labels, imdb.balance.strategy) == (["neg", "pos"], "none")
    assert (imdb.split.seed, imdb.split.train, imdb.split.validation, imdb.split.test) == (123, 0.7, 0.1, 0.2)
    assert (imdb.model.name, imdb.model.weights) == ("gpt2-small", "pretrained")
    assert (imdb.finetune.trainable_blocks, imdb.finetune.epochs) == ("all", 1)
    assert (imdb.pad_encode.max_length, imdb.pad_encode.truncate) == (256, "head")  # the bonus script's first 256
    assert (imdb.finetune.lr, imdb.finetune.batch_size, imdb.finetune.weight_decay) == (5e-5, 8, 0.1)


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ({"../evil.csv": b"text,label\n"}, "would extract outside its folder"),
        ({"/abs/evil.csv": b"text,label\n"}, "would extract outside its folder"),
        ({"evil.csv": b"\0" * 5000}, "expands to 5000 bytes, over data.max_unzipped_mb"),
    ],
)
def test_tar_members_are_bounded_and_kept_inside(tmp_path, members, message):
    archive = write(tmp_path, "bad.tar.gz", tar_gz(members))
    name = next(iter(members)).rsplit("/", 1)[-1]
    with pytest.raises(DownloadError, match=message) as info:
        fetch(archive, name, tmp_path / "out", max_unzipped_mb=1000 / 2**20)
    assert str(archive) in str(info.value) and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("name", "content", "data", "message"),
    [
        ("u.csv", b"text,label\nok,a\n,b\n", {"format": "csv"}, r"^u.csv:3: empty text \(data.text_column 'text'\)"),
        (
            "u.csv",
            b"body,label\nok,a\n",
            {"format": "csv"},
            r"^u.csv: no column 'text' in its header \['body', 'label'\]"
            r"; set data.text_column",
        ),
        ("u.csv", b"text,label\nok,a\nok,b,extra\n", {"format": "csv"}, r"^u.csv:3: 3 fields where the header has 2"),
        (
            "u.jsonl",
            b'{"text": "a", "label": "x"}\n{"text": "b"}\n',
            {"format": "jsonl"},
            r"^u.jsonl:2: no key 'label'",
        ),
        ("u.jsonl", b'{"text": "a", "label": "x"}\nnot json\n', {"format": "jsonl"}, r"^u.jsonl:2: not JSON"),
        (
            "u.jsonl",
            b'{"text": "a", "label": "x"}\n{"text": "  ", "label": "y"}\n',
            {"format": "jsonl"},
            r"^u.jsonl:2: empty text",
        ),
        ("u.tsv", b"text\tlabel\nok\t\n", {"format": "tsv"}, r"^u.tsv:2: empty label \(data.label_column 'label'\)"),
        ("u.csv", b"text,label\nok,a\n\xff,b\n", {"format": "csv"}, r"^u.csv:3: not valid UTF-8"),
        ("u.tsv", b"\n", {"format": "sms"}, r"^u.tsv: the file is empty; expected lines of 'label<TAB>text'$"),
        (
            "u.jsonl",
            b"\xef\xbb\xbf \n",
            {"format": "jsonl"},
            r"^u.jsonl: the file is empty; expected labelled texts in columns 'text' and 'label'$",
        ),
        (
            "u.csv",
            b"body,intent\n",
            {"format": "csv", "text_column": "body", "label_column": "intent"},
            r"^u.csv: holds no rows; expected labelled texts in columns 'body' and 'intent'$",
        ),
    ],  # fmt: skip
)
def test_bad_rows_are_named_by_file_and_line(tmp_path, name, content, data, message):
    with pytest.raises(DataError, match=message) as info:
        read(write(tmp_path, name, content), **data)
    assert "\n" not in str(info.value) and str(tmp_path) not in str(info.value)  # the user's file name, one line


def test_every_data_format_has_its_reader():
    assert set(READERS) == set(get_args(DataFormat))


def test_parquet_rows_and_unknown_labels_are_named(tmp_path):
    path = write(tmp_path, "u.parquet", parquet_bytes([("ok", "a"), ("", "b")]))
    with pytest.raises(DataError, match=r"^u.parquet row 2: empty text"):
        read(path, format="parquet")
    texts = read(write(tmp_path, "v.csv", b"text,label\nok,a\nfine,b\nwhat,c\n"), format="csv")
    with pytest.raises(
        DataError, match=r"^v.csv:4: unknown label 'c'; expected one of \['a', 'b'\] \(balance.labels\)"
    ):
        number_labels(texts, ["a", "b"])


def test_the_data_file_is_named_as_the_user_gave_it():
    assert data_name(DataParams(url="https://x.org/sms+spam+collection.zip")) == "SMSSpamCollection"
    assert data_name(DataParams(url="/home/me/tickets.csv", format="csv", member=None)) == "tickets.csv"
    assert data_name(DataParams(url="https://x.org/aclImdb_v1.tar.gz", format="folders", member="a/b")) == (
        "aclImdb_v1.tar.gz"
    )


def test_new_params_have_one_line_errors():
    base = {"data": {"url": "x"}}
    for change, message in [
        ({"data": {"url": "x", "format": "xml"}}, "data.format: Input should be 'sms', 'csv'"),
        ({"data": {"url": "x", "format": "csv", "text_column": "a", "label_column": "a"}}, "both 'a'"),
        ({"balance": {"strategy": "oversample"}}, "balance.strategy: Input should be 'undersample' or 'none'"),
        ({"pad_encode": {"truncate": "middle"}}, "pad_encode.truncate: Input should be 'head' or 'tail'"),
        ({"finetune": {"class_weights": "inverse"}}, "finetune.class_weights: Input should be 'balanced' or 'none'"),
        (
            {"data": {"url": "x", "format": "csv", "member": ["a.csv", "b.csv"]}},
            r"data: member is a list \(\['a.csv', 'b.csv'\]\), which only format folders reads; give format 'csv' "
            "one member, the data file's path in the archive",
        ),
        ({"data": {"url": "x", "format": "folders", "member": []}}, "data.member: is an empty list; name the folders"),
        ({"data": {"url": "x", "format": "folders", "member": ["a/b", "a/b/"]}}, "data.member: lists 'a/b' twice"),
        ({"data": {"url": "x", "format": "folders", "member": ["a", None]}}, "data.member: lists an empty folder"),
    ]:
        with pytest.raises(ParamsError, match=message) as info:
            parse_params(base | change)
        assert "\n" not in str(info.value)
    assert parse_params(base | {"balance": {"labels": None}}).balance.labels is None


def messages(labels) -> Messages:
    n = len(labels)
    return Messages([f"m{i}" for i in range(n)], np.array(labels, dtype=np.int64), np.arange(1, n + 1))


def test_stratified_split_keeps_each_class_share_and_small_classes_are_refused():
    frame = messages([0] * 70 + [1] * 20 + [2] * 10)
    parts = split(frame, 0.7, 0.1, 0.2, seed=1, stratify=True)
    counts = {name: np.bincount(p.labels, minlength=3).tolist() for name, p in parts.items()}
    assert counts == {"train": [49, 14, 7], "validation": [7, 2, 1], "test": [14, 4, 2]}
    assert parts["train"].labels.tolist() != sorted(parts["train"].labels.tolist())  # shuffled across classes
    with pytest.raises(
        DataError, match=r"class 'rare' has 2 examples in the data, too few to split into train, validation"
    ):
        split(messages([0] * 50 + [1] * 2), 0.7, 0.1, 0.2, seed=1, labels=["common", "rare"])
    with pytest.raises(
        DataError, match=r"class 'b' has 5 examples in the data, too few to give each of .* \(split.stratify\)"
    ):
        split(messages([0] * 50 + [1] * 5), 0.7, 0.1, 0.2, seed=1, stratify=True, labels=["a", "b"])


def test_truncate_tail_keeps_the_end_and_is_recorded():
    assert pad([[1, 2, 3, 4, 5]], [0], 3, "head").input_ids.tolist() == [[1, 2, 3]]
    assert pad([[1, 2, 3, 4, 5]], [0], 3, "tail").input_ids.tolist() == [[3, 4, 5]]
    splits = {name: messages([0, 1, 2]) for name in ("train", "validation", "test")}
    _, meta = pad_encode(splits, ["a", "b", "c"], 1, 1024, "tail")
    assert meta.truncate == "tail" and meta.labels == ["a", "b", "c"]


def test_balanced_class_weights_and_per_class_metrics():
    labels = torch.tensor([0] * 6 + [1] * 3 + [2] * 3 + [-100])
    weights = class_weights(labels, 3, ignore_index=-100)
    assert weights.tolist() == pytest.approx([12 / 18, 12 / 9, 12 / 9])  # n / (classes * count), -100 skipped
    actual = np.array([0, 0, 1, 1, 2, 2])
    probs = np.eye(3, dtype=np.float32)[[0, 1, 1, 1, 2, 0]]
    report = per_class_report(actual, probs, ["a", "b", "c"])
    assert report["per_class"]["a"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert report["per_class"]["b"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    assert report["macro"]["recall"] == pytest.approx((0.5 + 1 + 0.5) / 3)
