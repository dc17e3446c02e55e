import hashlib
import subprocess
import sys
import zipfile

import pytest
from conftest import PROJECT, make_messages, send_slowly, zip_bytes

from gpt2_classifier.core.errors import DownloadError
from gpt2_classifier.core.params import DataParams
from gpt2_classifier.core.redact import redact
from gpt2_classifier.data.download import fetch_data_file

DATA = make_messages()
SHA = hashlib.sha256(DATA).hexdigest()
ZIP = zip_bytes({"SMSSpamCollection": DATA, "readme": b"about"})


def fetch(sources, dest, sha=SHA, member="SMSSpamCollection", **settings):
    """fetch_data_file with data.url the first source and the others its mirrors; `settings` are data's."""
    settings = {"retries": 0, "timeout": 5} | settings
    data = DataParams(url=sources[0], mirrors=sources[1:], member=member, sha256=sha, **settings)
    return fetch_data_file(data, dest)


def test_http_primary_fails_then_mirror_succeeds(server, tmp_path, caplog):
    primary = server.serve("/broken.zip", b"boom", status=500)
    mirror = server.serve("/mirror.zip", ZIP)
    dest = tmp_path / "out" / "messages.tsv"
    assert fetch([primary, mirror], dest) == mirror
    assert dest.read_bytes() == DATA
    assert [path for _, path, _ in server.requests] == ["/broken.zip", "/mirror.zip"]
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"{primary}: HTTP 500 after 1 attempts"
    ]  # the user learns that the mirror was used, and why


def test_data_that_arrived_but_is_wrong_gets_its_own_fix_once(server, tmp_path, caplog):
    """A server that answers with an archive lacking the member: the fix is data.member, not the
    offline advice for a source that cannot be reached; and the failure is said once, in the error."""
    url = server.serve("/other.zip", zip_bytes({"other.txt": DATA}))
    with pytest.raises(DownloadError) as info:
        fetch([url], tmp_path / "out" / "messages.tsv")
    assert str(info.value) == (
        f"could not get 'SMSSpamCollection' from {url} ({url}: zip has no member 'SMSSpamCollection' "
        "(data.member); it holds ['other.txt']: set data.member to one of them)."
    )
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_retries_a_failing_server_a_bounded_number_of_times(server, tmp_path):
    url = server.serve("/flaky.zip", b"", status=503)
    with pytest.raises(DownloadError, match=r"HTTP 503 after 2 attempts"):
        fetch([url], tmp_path / "messages.tsv", retries=1)
    assert len(server.requests) == 2


def test_checksum_mismatch_is_refused_and_leaves_no_output(server, tmp_path):
    url = server.serve("/other.zip", zip_bytes({"SMSSpamCollection": b"ham\tdifferent\n"}))
    dest = tmp_path / "messages.tsv"
    with pytest.raises(DownloadError, match=r"SHA-256 of the data file is [0-9a-f]{64}, expected " + SHA):
        fetch([url], dest)
    assert list(tmp_path.iterdir()) == []  # no output, no temporary file


def test_file_url_and_plain_path_and_raw_data_file(tmp_path):
    archive = tmp_path / "sms spam.zip"
    archive.write_bytes(ZIP)
    raw = tmp_path / "SMSSpamCollection"
    raw.write_bytes(DATA)
    for source in (archive.as_uri(), str(archive), str(raw)):
        dest = tmp_path / "out" / "messages.tsv"
        assert fetch([source], dest) == source
        assert dest.read_bytes() == DATA


def test_a_missing_local_copy_is_not_blamed_on_the_network(tmp_path):
    missing = tmp_path / "sms+spam+collection.zip"
    with pytest.raises(DownloadError) as info:
        fetch([str(missing)], tmp_path / "out" / "messages.tsv")
    assert str(info.value) == (
        f"could not get 'SMSSpamCollection' from {missing} ({missing}: no such file). "
        "Set data.url to the zip or data file as it is on this machine"
    )


def test_a_folder_as_the_source_is_named_as_one(tmp_path):
    with pytest.raises(
        DownloadError, match=rf"\({tmp_path}: a folder; give the zip or the data file itself \(data.format folders"
    ):
        fetch([str(tmp_path)], tmp_path / "out" / "messages.tsv")


def test_offline_error_is_one_line_naming_the_url_and_the_local_copy_way(tmp_path):
    url = "http://127.0.0.1:9/sms+spam+collection.zip"  # port 9: nothing listens
    with pytest.raises(DownloadError) as info:
        fetch([url], tmp_path / "messages.tsv")
    message = str(info.value)
    assert "\n" not in message
    assert url in message and "data.url" in message and "local" in message
    assert not (tmp_path / "messages.tsv").exists()


def test_stage_script_prints_one_line_error_and_exits_nonzero(tmp_path):
    (tmp_path / "params.yaml").write_text("data:\n  url: http://127.0.0.1:9/x.zip\n  retries: 0\n")
    result = subprocess.run(
        [sys.executable, str(PROJECT / "stages" / "download.py")], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "http://127.0.0.1:9/x.zip" in errors[0]
    assert not (tmp_path / "data" / "raw" / "source").exists()


@pytest.mark.parametrize(
    ("archive", "message"),
    [
        (zip_bytes({"other.txt": DATA}), "zip has no member 'SMSSpamCollection'"),
        (zip_bytes({"../SMSSpamCollection": DATA}), "would extract outside its folder"),
        (ZIP[: len(ZIP) // 2], "corrupt or truncated zip"),
    ],
)
def test_bad_zips_are_refused(tmp_path, archive, message):
    path = tmp_path / "bad.zip"
    path.write_bytes(archive)
    with pytest.raises(DownloadError, match=message):
        fetch([str(path)], tmp_path / "out" / "messages.tsv")


def test_two_members_of_the_same_name_are_refused_and_a_full_path_picks_one(tmp_path, server):
    archive = zip_bytes({"backup/SMSSpamCollection": b"ham\told copy\n", "sms/SMSSpamCollection": DATA})
    url = server.serve("/two.zip", archive)
    with pytest.raises(DownloadError) as info:
        fetch([url], tmp_path / "out" / "messages.tsv")
    message = str(info.value)
    assert "zip holds 2 members named 'SMSSpamCollection' (backup/SMSSpamCollection, sms/SMSSpamCollection)" in message
    assert url in message and ".download." not in message  # the user's URL, not where it was downloaded to
    fetch([url], tmp_path / "out" / "messages.tsv", sha=None, member="backup/SMSSpamCollection")
    assert (tmp_path / "out" / "messages.tsv").read_bytes() == b"ham\told copy\n"


def test_zip_bomb_is_bounded(tmp_path):
    path = tmp_path / "bomb.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("SMSSpamCollection", b"\0" * (3 << 20))
    assert path.stat().st_size < 10_000
    with pytest.raises(DownloadError, match="expands to 3145728 bytes"):
        fetch([str(path)], tmp_path / "out" / "messages.tsv", max_unzipped_mb=1)


def test_unsupported_scheme_and_redacted_credentials(tmp_path):
    with pytest.raises(DownloadError, match="unsupported scheme 'ftp'"):
        fetch(["ftp://example.org/x.zip"], tmp_path / "m.tsv")
    assert redact("https://user:secret@host:8443/x.zip") == "https://***@host:8443/x.zip"
    with pytest.raises(DownloadError) as info:
        fetch(["http://user:secret@127.0.0.1:9/x.zip"], tmp_path / "m.tsv")
    assert "secret" not in str(info.value)


def test_real_zip_from_loopback_server(server, shared_data, tmp_path):
    url = server.serve(
        "/static/public/228/sms+spam+collection.zip", (shared_data / "sms+spam+collection.zip").read_bytes()
    )
    dest = tmp_path / "messages.tsv"
    fetch([url], dest, sha="7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d")
    assert dest.read_bytes() == (shared_data / "SMSSpamCollection").read_bytes()


def test_connection_dropped_mid_download_is_retried_and_verified(server, tmp_path):
    attempts = []

    def flaky(handler):
        attempts.append(1)
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(ZIP)))
        handler.end_headers()
        if len(attempts) == 1:  # the first answer breaks off halfway
            handler.wfile.write(ZIP[: len(ZIP) // 2])
            handler.wfile.flush()
            handler.close_connection = True
            return
        handler.wfile.write(ZIP)

    server.routes["/flaky.zip"] = flaky
    dest = tmp_path / "messages.tsv"
    fetch([server.url + "/flaky.zip"], dest, retries=2)
    assert len(attempts) == 2 and dest.read_bytes() == DATA


def test_a_trickling_server_is_stopped_at_the_deadline(server, tmp_path):
    import time

    def trickle(handler):  # a byte every 0.1 s: each read returns in time, the whole never ends
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(ZIP)))
        handler.end_headers()
        send_slowly(handler, ZIP[:100])

    server.routes["/slow.zip"] = trickle
    url = server.url + "/slow.zip"
    start = time.monotonic()
    with pytest.raises(DownloadError) as info:
        fetch([url], tmp_path / "m.tsv", retries=2, deadline=1.5)
    assert time.monotonic() - start < 5  # the deadline holds across reads and retries
    assert f"{url}: not done within 1.5 s (data.deadline)" in str(info.value)
    assert len(server.requests) == 1  # a deadline is not retried


def test_404_gets_bounded_retries_then_names_the_url(server, tmp_path):
    url = server.url + "/missing.zip"
    with pytest.raises(DownloadError, match=r"/missing.zip: HTTP 404 after 2 attempts") as info:
        fetch([url], tmp_path / "messages.tsv", retries=1)
    assert url in str(info.value) and len(server.requests) == 2


def test_a_server_that_hangs_times_out(server, tmp_path):
    import time

    server.routes["/slow.zip"] = lambda handler: time.sleep(3)
    start = time.monotonic()
    with pytest.raises(DownloadError, match=r"/slow.zip: no answer within 0.5 s, 2 attempts"):
        fetch([server.url + "/slow.zip"], tmp_path / "messages.tsv", retries=1, timeout=0.5)
    assert time.monotonic() - start < 10
