"""The `dvc plots` page: whole epochs on the accuracy chart, one confusion matrix with its counts, a page
that says what it needs when the CDN cannot be reached, and `make plots-offline`'s page that draws with
no network (tools/offline_plots.py). Drawn from small CSVs written in place of a run's reports."""

import json
import re
import shutil
import struct
import subprocess
import zlib

import pytest
import yaml
from conftest import PROJECT, make_project, run, tiny_params

REPORTS = {
    "reports/train/loss.csv": "step,train_loss_estimate,validation_loss_estimate\n0,0.9,0.95\n5,0.6,0.7\n10,0.4,0.5\n",
    "reports/train/accuracy.csv": "epoch,train_accuracy_estimate,validation_accuracy_estimate,validation_accuracy\n"
    "1,0.7,0.65,0.66\n2,0.9,0.85,0.86\n",
    "reports/eval/confusion.csv": "actual,predicted\n" + "ham,ham\n" * 5 + "ham,spam\n" + "spam,spam\n" * 3,
    "reports/eval/roc.csv": "fpr,tpr\n0,0\n0.2,0.8\n1,1\n",
    "reports/eval/pr.csv": "recall,precision\n0,1\n0.8,0.9\n1,0.5\n",
    "reports/eval/reliability.csv": "confidence,accuracy\n0.55,0.5\n0.95,0.9\n",
}
VEGA_PLOTS = [next(iter(p)) for p in yaml.safe_load((PROJECT / "dvc.yaml").read_text())["plots"] if isinstance(p, dict)]


def png_1x1() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)  # 1x1, 8-bit grey
    pixels = chunk(b"IDAT", zlib.compress(b"\x00\x80"))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + pixels + chunk(b"IEND", b"")


BLOCKED = "--host-resolver-rules=MAP * ~NOTFOUND"  # no name resolves: the browser is offline


@pytest.fixture
def project(tmp_path):
    """A project copy holding a run's plotted reports (and a PNG for the image plots)."""
    project = make_project(tmp_path / "p", tiny_params("file:///nowhere.zip", None))
    for path, text in REPORTS.items():
        (project / path).parent.mkdir(parents=True, exist_ok=True)
        (project / path).write_text(text)
    for entry in yaml.safe_load((project / "dvc.yaml").read_text())["plots"]:
        if isinstance(entry, str):
            (project / entry).write_bytes(png_1x1())
    return project


def rendered_dom(page) -> str:
    """The page's DOM after its scripts ran in headless Chromium with no network."""
    if not shutil.which("chromium"):
        pytest.skip("Debian's chromium is not installed (.ci/run installs it): the page was not drawn")
    done = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", BLOCKED,
                           "--virtual-time-budget=10000", "--dump-dom", page.as_uri()],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0 and "</html>" in done.stdout, done.stderr[-2000:]
    return done.stdout


def test_whole_epochs_and_one_confusion_matrix_with_its_counts(project):
    plots = json.loads(run(["dvc", "plots", "show", "--json"], project).stdout)["data"]
    (accuracy,) = plots["accuracy"]
    assert accuracy["content"]["encoding"]["x"]["axis"] == {"tickMinStep": 1, "format": "d"}  # 1, 2: no 1.5
    (confusion,) = plots["confusion"]
    (text,) = [layer for layer in confusion["content"]["spec"]["layer"] if layer.get("mark") == "text"]
    assert text["encoding"]["text"] == {"field": "xy_count", "type": "quantitative"}  # shown, not behind a checkbox
    assert "params" not in confusion["content"]
    assert [name for name in plots if "confusion" in name] == ["confusion"]  # the PNG is MLflow's, not drawn twice


def test_the_page_says_what_it_needs_when_the_cdn_cannot_be_reached(project):
    run(["dvc", "plots", "show"], project)
    page = project / "dvc_plots" / "index.html"
    html = page.read_text()
    assert '<script src="https://cdn.jsdelivr.net/npm/vega@' in html  # DVC's page, as online
    assert '<p id="needs-vega" hidden>' in html
    dom = rendered_dom(page)
    note = re.search(r'<p id="needs-vega"[^>]*>(.*?)</p>', dom, re.S)
    assert note and "hidden" not in note.group(0).split(">")[0], note  # shown: the CDN was not reached
    assert "make plots-offline" in note.group(1)
    assert 'class="vega-embed' not in dom


def test_make_plots_offline_writes_a_page_that_draws_without_a_network(project):
    if not shutil.which("npm"):
        pytest.skip("npm is not installed: make plots-offline cannot fetch vega, vega-lite and vega-embed")
    made = run(["python", str(PROJECT / "tools" / "offline_plots.py")], project, timeout=900)
    assert "vega@5.20.2, vega-lite@5.2.0, vega-embed@6.18.2 inlined" in made.stdout
    assert "plots/offline.html" in (project / ".dvc" / "config.local").read_text()
    assert "offline.html" not in run(["git", "status", "--porcelain"], project).stdout  # git ignores it
    run(["dvc", "plots", "show"], project)
    page = project / "dvc_plots" / "index.html"
    html = page.read_text()
    assert "<script src=" not in html and "cdn.jsdelivr.net/npm" not in html
    for package in ("vega@5.20.2", "vega-lite@5.2.0", "vega-embed@6.18.2"):
        assert f"<script>/* {package} */" in html
    assert len(html) > 500_000  # the libraries' code itself
    dom = rendered_dom(page)
    assert dom.count('class="vega-embed') == len(VEGA_PLOTS) == 6  # every chart drawn offline
    assert re.search(r'<p id="needs-vega"[^>]*\bhidden\b', dom)  # and nothing to say
