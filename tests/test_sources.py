"""What DVC serves is what the source holds: a data file or URL outside the project, rewritten under the
same name, is read again on the next `dvc repro` (DVC cannot see it, and its run-cache keys on params and
code only); an unchanged one is not, and reruns nothing downstream. And a mistake anywhere in params.yaml
fails the first stage of every `dvc repro`, not the first stage that happens to rerun."""

import hashlib
import os
import time

import pytest
import yaml
from conftest import make_messages, make_project, run, stages_run, tiny_params, zip_bytes

from gpt2_classifier.core.errors import DownloadError
from gpt2_classifier.core.params import DataParams
from gpt2_classifier.data.download import update_data_file


def set_params(project, **changes) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        params.setdefault(section, {})[key] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def rewrite(path, data: bytes, age: float) -> None:
    """`data` under the same name, its time `age` seconds ago (older than the racy window: only its
    size and time can tell that it changed)."""
    path.write_bytes(data)
    stamp = time.time() - age
    os.utime(path, (stamp, stamp))


@pytest.mark.slow
def test_a_data_file_outside_the_project_rewritten_under_its_name_is_read_again(tmp_path):
    source = tmp_path / "exports" / "messages.tsv"
    source.parent.mkdir()
    first, second, third = (make_messages(60, 20, seed=seed) for seed in (1, 2, 3))
    rewrite(source, first, age=600)
    project = make_project(tmp_path / "p", tiny_params(str(source), None))

    def repro():
        result = run(["dvc", "repro", "balance"], project)
        return stages_run(result.stdout), result.stdout

    assert repro()[0] == ["download", "balance"]
    ran, out = repro()
    assert ran == ["download"] and "data/raw/source is up to date" in out  # not read again: nothing reruns
    assert (project / "data/raw/source").read_bytes() == first

    second = second[: len(first)].ljust(len(first), b"x")  # the same size: only its time tells
    rewrite(source, second, age=300)
    assert repro()[0] == ["download", "balance"]
    assert (project / "data/raw/source").read_bytes() == second

    # A param changed and changed back: DVC's run-cache holds the first run's output for these params
    set_params(project, data__timeout=31)
    assert repro()[0] == ["download"]  # read again (other params), the same bytes: balance does not rerun
    rewrite(source, third, age=200)
    set_params(project, data__timeout=30)
    assert repro()[0] == ["download", "balance"]
    assert (project / "data/raw/source").read_bytes() == third


@pytest.mark.slow
def test_an_unknown_section_of_params_yaml_fails_the_next_repro_at_once(tmp_path):
    source = tmp_path / "messages.tsv"
    rewrite(source, make_messages(60, 20, seed=1), age=600)
    project = make_project(tmp_path / "p", tiny_params(str(source), None))
    run(["dvc", "repro", "balance"], project)
    set_params(project, training__epochs=3)
    result = run(["dvc", "repro", "balance"], project, check=False)
    assert result.returncode != 0 and stages_run(result.stdout) == ["download"]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors[0] == "error: params.yaml: training: unknown key; remove it or fix its spelling"


DATA = make_messages(30, 10, seed=4)
ZIP = zip_bytes({"SMSSpamCollection": DATA})


def conditional(body: bytes, validators: dict[str, str]):
    """A route answering 304 to a request whose If-None-Match or If-Modified-Since matches, else `body`."""

    def answer(handler) -> None:
        etag, modified = validators.get("ETag"), validators.get("Last-Modified")
        if (etag and handler.headers.get("If-None-Match") == etag) or (
            modified and handler.headers.get("If-Modified-Since") == modified
        ):
            handler.send_response(304)
            handler.end_headers()
            return
        handler.send_response(200)
        for name, value in validators.items():
            handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    return answer


def test_a_url_is_asked_whether_it_changed_and_read_again_only_when_it_did(server, tmp_path, caplog):
    url = server.url + "/sms.zip"
    data = DataParams(url=url, sha256=None, retries=0, timeout=5)
    dest, state = tmp_path / "raw" / "source", tmp_path / "state.json"
    server.routes["/sms.zip"] = conditional(ZIP, {"ETag": '"v1"'})
    assert update_data_file(data, dest, state).changed and dest.read_bytes() == DATA
    assert "If-None-Match" not in server.requests[-1][2]

    assert not update_data_file(data, dest, state).changed  # 304: not read again
    assert server.requests[-1][2]["If-None-Match"] == '"v1"' and dest.read_bytes() == DATA

    other = make_messages(30, 10, seed=5)
    server.routes["/sms.zip"] = conditional(zip_bytes({"SMSSpamCollection": other}), {"ETag": '"v2"'})
    assert update_data_file(data, dest, state).changed and dest.read_bytes() == other

    date = "Wed, 21 Oct 2015 07:28:00 GMT"  # a server that gives only Last-Modified
    server.routes["/sms.zip"] = conditional(ZIP, {"Last-Modified": date})
    assert update_data_file(data, dest, state).changed and dest.read_bytes() == DATA
    assert not update_data_file(data, dest, state).changed
    assert server.requests[-1][2]["If-Modified-Since"] == date

    server.routes["/sms.zip"] = (200, {}, ZIP)  # no validators: read every time, the output's bytes the same
    before = dest.stat().st_mtime_ns
    assert update_data_file(data, dest, state).changed and update_data_file(data, dest, state).changed
    assert dest.read_bytes() == DATA and dest.stat().st_mtime_ns != before

    # Offline (the server gone): the output stays as fetched, with a warning that says so
    server.routes["/sms.zip"] = (503, {}, b"")
    caplog.clear()
    assert not update_data_file(data, dest, state).changed and dest.read_bytes() == DATA
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(
        "could not check the data's source" in w and f"{dest} stays as fetched from {url} (on " in w for w in warnings
    )


def test_a_record_of_other_params_or_another_output_is_not_trusted(tmp_path):
    source = tmp_path / "messages.tsv"
    rewrite(source, DATA, age=600)
    data = DataParams(url=str(source), member=None, sha256=None, retries=0)
    dest, state = tmp_path / "raw" / "source", tmp_path / "state.json"
    assert update_data_file(data, dest, state).changed
    assert not update_data_file(data, dest, state).changed
    dest.write_bytes(b"ham\tedited by hand\n")  # the output is not what was fetched: fetch again
    assert update_data_file(data, dest, state).changed and dest.read_bytes() == DATA
    pinned = data.model_copy(update={"sha256": hashlib.sha256(DATA).hexdigest()})
    assert update_data_file(pinned, dest, state).changed  # other params: fetch (and verify) again
    assert not update_data_file(pinned, dest, state).changed
    rewrite(source, DATA, age=600)  # the same bytes, a new time: read again, the same output
    assert update_data_file(pinned, dest, state).changed and dest.read_bytes() == DATA
    assert b"https://" not in state.read_bytes() and str(source).encode() not in state.read_bytes()


def test_a_folder_of_texts_outside_the_project_is_watched_file_by_file(tmp_path):
    folder = tmp_path / "tickets"
    for label, text in (("billing", "charged twice"), ("shipping", "parcel late")):
        (folder / label).mkdir(parents=True)
        rewrite(folder / label / "1.txt", text.encode(), age=600)
    data = DataParams(url=str(folder), format="folders", member=None, sha256=None, retries=0)
    dest, state = tmp_path / "raw" / "source", tmp_path / "state.json"
    assert update_data_file(data, dest, state).changed
    assert not update_data_file(data, dest, state).changed
    rewrite(folder / "billing" / "2.txt", b"invoice wrong", age=600)
    assert update_data_file(data, dest, state).changed


def test_a_pulled_output_stays_where_its_source_cannot_be_reached_only_if_dvc_lock_vouches_for_it(tmp_path, caplog):
    """A fresh clone after `dvc pull` has no record of ours, and maybe no access to the source (another
    machine's file): the output stays, with a warning, where dvc.lock records it for the same data params."""
    source = tmp_path / "elsewhere" / "messages.tsv"
    data = DataParams(url=str(source), member=None, sha256=None, retries=0)
    dest, state, lock = tmp_path / "raw" / "source", tmp_path / "state.json", tmp_path / "dvc.lock"
    dest.parent.mkdir()
    dest.write_bytes(DATA)
    out = {"path": str(dest), "hash": "md5", "md5": hashlib.md5(DATA).hexdigest(), "size": len(DATA)}
    recorded = {"params.yaml": {"data": {"url": str(source), "member": None, "sha256": None, "retries": 0}}}
    lock.write_text(yaml.safe_dump({"stages": {"download": {"params": recorded, "outs": [out]}}}))
    assert not update_data_file(data, dest, state, lock).changed and dest.read_bytes() == DATA
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(f"{source}: no such file" in w and "(recorded in dvc.lock)" in w for w in warnings)

    other = data.model_copy(update={"url": str(tmp_path / "other.tsv")})  # params the lock does not record
    with pytest.raises(DownloadError, match="no such file"):
        update_data_file(other, dest, state, lock)
    dest.write_bytes(b"ham\tedited\n")  # bytes the lock does not record
    with pytest.raises(DownloadError, match="no such file"):
        update_data_file(data, dest, state, lock)


def test_a_source_that_now_holds_other_data_is_an_error_even_with_an_output_to_fall_back_on(server, tmp_path):
    """data.sha256 pins the data: a URL that changed is refused, not hidden behind the last run's output."""
    url = server.serve("/sms.zip", ZIP, headers={"ETag": '"v1"'})
    data = DataParams(url=url, mirrors=[server.url + "/gone.zip"], sha256=hashlib.sha256(DATA).hexdigest(), retries=0)
    dest, state = tmp_path / "raw" / "source", tmp_path / "state.json"
    assert update_data_file(data, dest, state).changed
    server.serve("/sms.zip", zip_bytes({"SMSSpamCollection": b"ham\tother data\n"}), headers={"ETag": '"v2"'})
    with pytest.raises(DownloadError, match="could not get .SMSSpamCollection. from"):  # data.url warned of it
        update_data_file(data, dest, state)
    assert dest.read_bytes() == DATA  # the verified data stays; the stage failed, so DVC records nothing
