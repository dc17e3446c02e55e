"""Own data as real tools export it: texts longer than the csv module's default field, Windows-1252,
labels that look alike or sort oddly, a numeric text column, one tiny class, files that are not what
their name says, the same text in more than one split; and the one-line warnings the data stages
print and record (data/balance.json, data/split/warnings.json)."""

import bz2
import csv
import gzip
import io
import json
import runpy

import pytest
import yaml
from conftest import PROJECT, zip_bytes
from test_readers import fetch, parquet_bytes, read, tar_gz, write

from gpt2_classifier.core.errors import DataError, DownloadError
from gpt2_classifier.core.params import DataParams
from gpt2_classifier.core.stage import run_stage
from gpt2_classifier.data.readers import data_warnings, number_labels, read_labelled

LONG = ('a long thread, "quoted", line\nafter line ' * 5_000)[:200_000]  # over the csv module's 131,072


def table(rows, header=("text", "label"), delimiter=",") -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=delimiter, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue().encode()


def rows_of(counts: dict[str, int], prefix: str = "text") -> list[tuple[str, str]]:
    return [(f"{prefix} {label} {i}", label) for label, count in counts.items() for i in range(count)]


def data_stages(project, monkeypatch, raw: bytes, stages=("balance", "split"), **sections) -> None:
    """Run the stages in `project` (in this process) on the downloaded data `raw`, with params.yaml made
    of `sections` (a csv of text,label, classes from the data, unless they say otherwise)."""
    monkeypatch.chdir(project)
    params = {"data": {"url": "inputs/tickets.csv", "format": "csv", "member": None}, "balance": {"labels": None}}
    for section, values in sections.items():
        params[section] = params.get(section, {}) | values
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    (project / "data" / "raw").mkdir(parents=True, exist_ok=True)
    (project / "data" / "raw" / "source").write_bytes(raw)
    for name in stages:
        run_stage(runpy.run_path(str(PROJECT / "stages" / f"{name}.py"))["main"])


def warnings_of(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning: ")]


def split_texts(project) -> list[str]:
    texts = []
    for name in ("train", "validation", "test"):
        with open(project / "data" / "split" / f"{name}.csv", newline="") as f:
            texts += [row["text"] for row in csv.DictReader(f)]
    return texts


# Long texts ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("data_format", ["csv", "jsonl"])
def test_a_text_of_200000_characters_goes_through_balance_and_split(tmp_path, monkeypatch, data_format):
    rows = [(LONG, "spam")] + rows_of({"ham": 10, "spam": 9})
    raw = table(rows) if data_format == "csv" else "".join(json.dumps({"text": t, "label": lab}) + "\n"
                                                         for t, lab in rows).encode()  # fmt: skip
    data_stages(tmp_path, monkeypatch, raw, data={"format": data_format})
    assert LONG in split_texts(tmp_path)


# Not UTF-8 -----------------------------------------------------------------------------------------


LATIN1 = "it looks like Latin-1 (ISO-8859-1); convert it to UTF-8: iconv -f latin1 -t utf-8 u.csv > u-utf8.csv"
CP1252 = "it looks like Windows-1252 (as Excel on Windows saves CSV: curly quotes, dashes, the euro sign); " + (
    "convert it to UTF-8: iconv -f cp1252 -t utf-8 u.csv > u-utf8.csv, and use that file"
)
UTF16 = "it is UTF-16 (as Excel saves 'Unicode Text'); convert it to UTF-8: iconv -f utf-16 -t utf-8 u.csv"


@pytest.mark.parametrize(
    ("text", "encoding", "advice"),
    [
        ("Gagnez un café gratuit", "latin-1", LATIN1),
        ("Win \u20ac100 \u2013 \u201cfree\u201d", "cp1252", CP1252),
        ("Gagnez un café", "utf-16", UTF16),
    ],
    ids=["latin1", "cp1252", "utf-16"],
)
def test_a_file_in_another_encoding_gets_the_command_that_converts_it(tmp_path, text, encoding, advice):
    path = write(tmp_path, "u.csv", f"text,label\n{text},a\nok,b\n".encode(encoding))
    with pytest.raises(DataError, match=r"^u.csv:\d+: not valid UTF-8 at byte \d+; ") as info:
        read(path, format="csv")
    assert advice in str(info.value) and "\n" not in str(info.value)
    if encoding == "cp1252":  # converted as advised, it reads as written
        converted = write(tmp_path, "u-utf8.csv", path.read_bytes().decode("cp1252").encode())
        assert read(converted, format="csv").texts[0] == text


def test_a_utf8_file_with_one_stray_byte_is_not_advised_to_be_converted_whole(tmp_path):
    path = write(tmp_path, "u.csv", "text,label\ncafé,a\n".encode() + b"bad \x92 quote,b\n")
    with pytest.raises(DataError, match=r"^u.csv:3: not valid UTF-8 at byte 23; the rest of it is UTF-8: fix"):
        read(path, format="csv")


# Labels --------------------------------------------------------------------------------------------


def test_whole_number_labels_are_classes_in_numeric_order(tmp_path):
    rows = [(f"text {i}", str(i % 11)) for i in range(33)]
    messages, labels = number_labels(read(write(tmp_path, "u.csv", table(rows)), format="csv"), None)
    assert labels == [str(i) for i in range(11)]  # not '0', '1', '10', '2'
    assert messages.labels.tolist() == [i % 11 for i in range(33)]  # class i is label i


def test_boolean_and_whole_float_labels_are_read_as_the_rows_hold_them(tmp_path):
    lines = [json.dumps({"text": f"t{i}", "label": i % 2 == 0}) for i in range(4)]
    texts = read(write(tmp_path, "u.jsonl", "\n".join(lines).encode()), format="jsonl")
    assert texts.labels == ["true", "false", "true", "false"]
    assert number_labels(texts, None)[1] == ["false", "true"]
    assert number_labels(texts, ["false", "true"])[0].labels.tolist() == [1, 0, 1, 0]  # balance.labels as written
    floats = read(write(tmp_path, "u.parquet", parquet_bytes([("a", 0.0), ("b", 1.0)])), format="parquet")
    assert floats.labels == ["0", "1"]
    with pytest.raises(DataError, match=r"^u2.jsonl:1: text is not text but a bool \(data.text_column 'text'\); "
                                        r"set data.text_column to the column of texts$"):  # fmt: skip
        read(write(tmp_path, "u2.jsonl", b'{"text": true, "label": "a"}\n'), format="jsonl")


def test_labels_that_differ_only_in_case_or_spaces_are_named(tmp_path, monkeypatch, capsys):
    rows = rows_of({"ham": 20, "spam": 10}) + rows_of({"Spam": 5, "spam ": 5}, prefix="other")
    data_stages(tmp_path, monkeypatch, table(rows), stages=["balance"])
    (line,) = warnings_of(capsys.readouterr().err)
    assert line == (
        "warning: tickets.csv: labels 'Spam' and 'spam' and 'spam ' differ only in case or spaces and become "
        "separate classes; fix them in the data to merge them, or list the classes in balance.labels to keep them "
        "apart (balance.quiet: [similar_labels] silences this)"
    )
    recorded = json.loads((tmp_path / "data" / "balance.json").read_text())["warnings"]
    assert recorded == [{"stage": "balance", "kind": "similar_labels", "message": line.removeprefix("warning: ")}]
    data_stages(tmp_path, monkeypatch, table(rows), stages=["balance"], balance={"quiet": ["similar_labels"]})
    assert warnings_of(capsys.readouterr().err) == []
    assert "warnings" not in json.loads((tmp_path / "data" / "balance.json").read_text())
    # classes listed in balance.labels: a row spelled otherwise is named with the spelling to use
    texts = read(write(tmp_path, "u.csv", table(rows)), format="csv")
    with pytest.raises(
        DataError, match=r"unknown label 'Spam'; .* \(balance.labels\): fix its case or spaces to 'spam'"
    ):
        number_labels(texts, ["ham", "spam"])


def test_a_numeric_column_chosen_as_the_texts_is_named(tmp_path, monkeypatch, capsys):
    rows = [(i, f"message {i}", ("a", "b")[i % 2]) for i in range(20)]
    data_stages(tmp_path, monkeypatch, table(rows, header=("id", "body", "label")), data={"text_column": "id"})
    assert warnings_of(capsys.readouterr().err)[0] == (
        "warning: tickets.csv: 20 of 20 texts in column 'id' (data.text_column) are numbers, not text; set "
        "data.text_column to the column of texts (balance.quiet: [numeric_texts] silences this)"
    )
    body = DataParams(url="u.csv", format="csv", text_column="body")
    texts = read(write(tmp_path, "u.csv", table(rows, header=("id", "body", "label"))), format="csv",
                 text_column="body")  # fmt: skip
    assert data_warnings(texts, None, body) == []


# One tiny class ------------------------------------------------------------------------------------


def test_one_tiny_class_that_cuts_every_class_is_named_and_so_is_it_when_split_fails(tmp_path, monkeypatch, capsys):
    rows = rows_of({"billing": 200, "refund": 3, "shipping": 200})
    with pytest.raises(SystemExit):
        data_stages(tmp_path, monkeypatch, table(rows))
    err = capsys.readouterr().err
    assert warnings_of(err) == [
        "warning: class 'refund' has 3 examples beside 200 or more of every other class, so balance.strategy "
        "undersample cuts every class to 3 (9 of 403 kept); add examples of 'refund' or remove its rows, or set "
        "balance.strategy: none and finetune.class_weights: balanced (balance.quiet: [undersampling] silences this)"
    ]
    (error,) = [line for line in err.splitlines() if line.startswith("error: ")]
    assert error == (
        "error: class 'refund' has 3 examples in inputs/tickets.csv (data.url), and balance.strategy undersample cut "
        "every class to 3: 9 are too few to split into train, validation, test; add examples of 'refund' or remove "
        "its rows, or set balance.strategy: none and finetune.class_weights: balanced"
    )
    assert "split.validation" not in err
    data_stages(tmp_path, monkeypatch, table(rows), balance={"strategy": "none"})  # the fix works
    assert warnings_of(capsys.readouterr().err) == []


def test_the_reference_cut_of_ham_to_spams_size_is_not_warned_about(tmp_path, monkeypatch, capsys):
    data_stages(tmp_path, monkeypatch, table(rows_of({"ham": 4827 // 20, "spam": 747 // 20})))
    assert warnings_of(capsys.readouterr().err) == []
    assert json.loads((tmp_path / "data" / "split" / "warnings.json").read_text()) == []


# Files that are not what their name says -----------------------------------------------------------


@pytest.mark.parametrize(
    ("delimiter", "data_format", "fix"),
    [
        ("\t", "csv", "the file is tab-separated: set data.format: tsv"),
        (",", "tsv", "the file is comma-separated: set data.format: csv"),
        (
            ";",
            "csv",
            "the file is separated by ';' (as Excel saves CSV in some languages): save it as 'CSV UTF-8' (commas)",
        ),
    ],
)
def test_a_file_separated_otherwise_is_named_with_the_format_to_set(tmp_path, delimiter, data_format, fix):
    path = write(tmp_path, "u.csv", table(rows_of({"a": 2, "b": 2}), delimiter=delimiter))
    with pytest.raises(DataError, match=r"^u.csv: no column 'text' in its header \[.*\]; (.*)$") as info:
        read(path, format=data_format)
    assert str(info.value).endswith(fix)


def xlsx() -> bytes:
    """The parts every .xlsx has (a zip of XML)."""
    return zip_bytes({"[Content_Types].xml": b"<Types/>", "_rels/.rels": b"<Relationships/>",
                      "xl/workbook.xml": b"<workbook/>", "xl/worksheets/sheet1.xml": b"<worksheet/>"})  # fmt: skip


def test_an_excel_workbook_is_named_as_one_wherever_it_is(tmp_path):
    workbook = write(tmp_path, "tickets.csv", xlsx())
    with pytest.raises(
        DownloadError, match=r"tickets.csv: this is an Excel workbook \(.xlsx\), not CSV; save it as CSV"
    ):
        fetch(workbook, None, tmp_path / "raw", format="csv")
    assert not (tmp_path / "raw").exists()
    packed = write(tmp_path, "export.zip", zip_bytes({"tickets.csv": xlsx()}))
    fetch(packed, "tickets.csv", tmp_path / "raw", format="csv")  # a member: balance names it
    with pytest.raises(DataError, match=r"^tickets.csv: this is an Excel workbook \(.xlsx\), not CSV; save it as"):
        read_labelled_as(tmp_path / "raw", "tickets.csv")
    with pytest.raises(DataError, match=r"^tickets.csv: this is an old Excel workbook \(.xls\)"):
        read_labelled_as(write(tmp_path, "old", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(100)), "tickets.csv")


def read_labelled_as(path, name):
    return read_labelled(path, DataParams(url=f"/x/{name}", format="csv", member=None), None, 1 << 20)


@pytest.mark.parametrize(("suffix", "compress"), [(".gz", gzip.compress), (".bz2", bz2.compress)])
def test_a_compressed_csv_is_read(tmp_path, suffix, compress):
    data = table(rows_of({"a": 3, "b": 3}))
    source = write(tmp_path, "tickets.csv" + suffix, compress(data))
    fetch(source, None, tmp_path / "raw", format="csv")
    assert (tmp_path / "raw").read_bytes() == data
    with pytest.raises(DownloadError, match=r"decompresses beyond data.max_unzipped_mb"):
        fetch(source, None, tmp_path / "raw2", format="csv", max_unzipped_mb=10 / 2**20)
    with pytest.raises(DownloadError, match=rf"cut.csv{suffix}: corrupt or truncated (gzip|bzip2) file"):
        fetch(write(tmp_path, "cut.csv" + suffix, compress(data)[:30]), None, tmp_path / "raw3", format="csv")
    packed = write(tmp_path, "export.zip", zip_bytes({"tickets.csv" + suffix: compress(data)}))
    fetch(packed, None, tmp_path / "raw4", format="csv")  # a member is copied as it is: balance names it
    with pytest.raises(DataError, match=r"compressed; give the .* itself as data.url \(download decompresses it\)"):
        read_labelled_as(tmp_path / "raw4", "tickets.csv" + suffix)


def test_what_macos_adds_to_an_archive_is_no_member(tmp_path):
    data = table(rows_of({"a": 3, "b": 3}))
    junk = {"__MACOSX/._tickets.csv": b"\x00\x05\x16\x07 resource fork", "._tickets.csv": b"\x00\x05\x16\x07",
            ".DS_Store": b"\x00\x00\x00\x01Bud1"}  # fmt: skip
    for archive in (write(tmp_path, "t.zip", zip_bytes({"tickets.csv": data} | junk)),
                    write(tmp_path, "t.tar.gz", tar_gz({"tickets.csv": data} | junk))):  # fmt: skip
        fetch(archive, None, tmp_path / "raw", format="csv")  # the one file, though the archive holds four
        assert (tmp_path / "raw").read_bytes() == data
    folders = {f"reviews/{lab}/{i}.txt": t.encode() for i, (t, lab) in enumerate(rows_of({"neg": 2, "pos": 2}))}
    folders |= {"reviews/pos/._0.txt": b"\x00\x05\x16\x07\xff", "__MACOSX/reviews/pos/._1.txt": b"\xff"}
    archive = write(tmp_path, "r.zip", zip_bytes(folders))
    fetch(archive, "reviews", tmp_path / "folders", format="folders")
    texts = read(tmp_path / "folders", format="folders", member="reviews")
    assert sorted(texts.labels) == ["neg", "neg", "pos", "pos"]


# The same text in more than one split --------------------------------------------------------------


def test_texts_in_more_than_one_split_are_counted_and_dedupe_drops_them(tmp_path, monkeypatch, capsys):
    rows = [(f"offer {i % 10}" if i % 2 else f"Offer {i % 10} ", "spam") for i in range(40)]
    rows += [(f"note {i}", "ham") for i in range(40)]
    data_stages(tmp_path, monkeypatch, table(rows))
    (line,) = warnings_of(capsys.readouterr().err)
    assert line.startswith("warning: ") and "validation texts are also in train, " in line
    assert line.endswith(
        "test texts are also in train or validation (the same text but for case and surrounding spaces): their scores "
        "overstate how the classifier does on new texts; set balance.dedupe: true to keep one copy of each text "
        "(split.quiet: [duplicates] silences this)"
    )
    recorded = json.loads((tmp_path / "data" / "split" / "warnings.json").read_text())
    assert recorded == [{"stage": "split", "kind": "duplicates", "message": line.removeprefix("warning: ")}]

    data_stages(tmp_path, monkeypatch, table(rows), balance={"dedupe": True})
    out, err = capsys.readouterr()
    assert "30 repeated texts dropped (balance.dedupe)" in out  # 10 offers kept of 40, every note
    assert warnings_of(err) == [] and json.loads((tmp_path / "data" / "split" / "warnings.json").read_text()) == []
    assert len({t.strip().casefold() for t in split_texts(tmp_path)}) == len(split_texts(tmp_path)) == 20
