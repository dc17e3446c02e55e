"""Screenshots of what a user sees after two experiments: MLflow's run list, the compare page
with "Show diff only", a metric chart of both runs, the Models tab, and `dvc plots diff`.

    python bench/screenshots.py [--out DIR]
    python bench/screenshots.py --smoke [--out DIR]   # the same steps small and quick (`make test`)

Runs two tiny experiments that differ in `finetune.lr` (real data when ../shared has it, else
made-up messages) in a temporary copy of the project, starts `mlflow ui` on 127.0.0.1, and
drives headless Chromium with Selenium. Needs Debian's `chromium` and `chromium-driver`, and
`pip install selenium`; the vega scripts of the `dvc plots` page come from the npm registry,
inlined by tools/offline_plots.py (make plots-offline), since the page's CDN is not reachable
offline. Prints the path of each PNG; look at them.

--smoke: made-up messages, a 2-block GPT of width 32, one epoch, the plots page that loads from the CDN
(no npm), short waits in the browser. Without Chromium, its driver or selenium it still runs both
experiments, `dvc plots diff`, the MLflow queries and `mlflow ui`, then says what is missing and exits
with status 4 (SKIPPED), so a test can tell "no browser here" from a failure.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT / "tests"))
from conftest import SHARED_DATA, made_zip, make_project, run, tiny_params  # noqa: E402

SKIPPED = 4  # --smoke's exit status where no browser can be driven (everything before it ran)
NO_BROWSER = "needs selenium (pip install selenium) and Debian's chromium and chromium-driver"


def browser_missing() -> str | None:
    """What is missing to drive headless Chromium, or None."""
    missing = [name for name in ("chromium", "chromedriver") if not shutil.which(name)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium")
    return f"{', '.join(missing)} not installed: {NO_BROWSER}" if missing else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def click(driver, by, xpath: str) -> bool:
    """Click the first element that `xpath` finds, if any; say whether one was clicked."""
    for element in driver.find_elements(by.XPATH, xpath):
        try:
            element.click()
            time.sleep(1.5)
            return True
        except Exception:  # hidden or covered: try the next one
            continue
    return False


def two_experiments(folder: Path, smoke: bool) -> Path:
    if (SHARED_DATA / "sms+spam+collection.zip").is_file() and not smoke:
        data = SHARED_DATA / "sms+spam+collection.zip"
        url, sha = data.as_posix(), hashlib.sha256((SHARED_DATA / "SMSSpamCollection").read_bytes()).hexdigest()
    else:
        url, sha = made_zip(folder)
    params = tiny_params(url, sha, finetune={"epochs": 1 if smoke else 3, "eval_freq": 5 if smoke else 20,
                                             "eval_iter": 2 if smoke else 5})  # fmt: skip
    width = 32 if smoke else 64
    params["model"]["config"] = {"emb_dim": width, "n_layers": 2, "n_heads": 2, "context_length": 256}
    project = make_project(folder / "project", params)
    for name, lr in (("lr-low", "5e-4"), ("lr-high", "2e-3")):
        print(f"dvc exp run -n {name} -S finetune.lr={lr}", flush=True)
        run(["dvc", "exp", "run", "-n", name, "-S", f"finetune.lr={lr}"], project, timeout=1200)
    return project


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "gpt2-classifier-screenshots")
    parser.add_argument("--smoke", action="store_true", help="made-up data, a smaller model, 1 epoch, short waits")
    args = parser.parse_args()
    missing = browser_missing()
    if missing and not args.smoke:
        sys.exit(missing)
    wait = 1 if args.smoke else 6  # seconds for a page to draw
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="screenshots-"))
    try:
        status = screenshots(args, work, missing, wait)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    sys.exit(status)


def screenshots(args: argparse.Namespace, work: Path, missing: str | None, wait: float) -> int:
    project = two_experiments(work, args.smoke)
    if not args.smoke:  # the page's vega scripts come from a CDN, unreachable here: make plots-offline
        run([sys.executable, str(PROJECT / "tools" / "offline_plots.py")], project, timeout=900)
    run(["dvc", "plots", "diff", "lr-low", "lr-high", "-o", "dvc_plots"], project)
    print(f"dvc plots diff: {project / 'dvc_plots' / 'index.html'}", flush=True)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("gpt2-classifier").experiment_id
    runs = {r.info.run_name: r.info.run_id for r in client.search_runs([experiment])}
    print(f"MLflow runs: {', '.join(sorted(runs))}", flush=True)
    if sorted(runs) != ["lr-high", "lr-low"]:
        sys.exit(f"expected the runs lr-high and lr-low in MLflow, found {sorted(runs)}")
    port = free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # the pages shown need no job workers (five processes)
    ui = subprocess.Popen(["mlflow", "ui", "--backend-store-uri", "sqlite:///mlflow.db", "--port", str(port)],
                          cwd=project, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          start_new_session=True)  # fmt: skip  # a group of its own: its workers stop with it
    base = f"http://127.0.0.1:{port}"
    driver = None
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(base, timeout=5).close()
                break
            except OSError:
                if ui.poll() is not None:
                    sys.exit(f"mlflow ui exited with status {ui.returncode} before answering")
                if time.monotonic() > deadline:
                    sys.exit("mlflow ui did not start within 120 s")
                time.sleep(1)
        print(f"mlflow ui answers on {base}", flush=True)
        if missing:
            print(f"SKIPPED the screenshots: {missing}", flush=True)
            return SKIPPED
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys

        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium") or ""
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1600,1100"):
            options.add_argument(flag)
        driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
        ids = json.dumps(list(runs.values()))
        training = "workflowType=machine_learning"  # the "Model training" side of the UI
        curve = "validation_loss_estimate"
        pages = {
            "1-run-list": f"{base}/#/experiments/{experiment}/runs?{training}",
            "2-compare": f"{base}/#/compare-runs?runs={urllib.parse.quote(ids)}&experiments=%5B%22{experiment}%22%5D",
            f"3-metric-{curve}": f"{base}/#/metric?runs={urllib.parse.quote(ids)}&metric=%22{curve}%22"
            f"&experiments=%5B%22{experiment}%22%5D&plot_metric_keys=%5B%22{curve}%22%5D",
            "4-models": f"{base}/#/experiments/{experiment}/models?{training}",
            "5-run-page": f"{base}/#/experiments/{experiment}/runs/{runs['lr-high']}",
            "5b-run-model-metrics": f"{base}/#/experiments/{experiment}/runs/{runs['lr-high']}/model-metrics",
            "5c-run-system-metrics": f"{base}/#/experiments/{experiment}/runs/{runs['lr-high']}/system-metrics",
            "6-dvc-plots-diff": (project / "dvc_plots" / "index.html").as_uri(),
        }
        for name, url in pages.items():
            driver.get(url)
            time.sleep(wait)
            click(driver, By, "//button[@aria-label='Close']")  # the assistant panel
            driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)  # feature tours
            if name == "1-run-list" and click(driver, By, "//*[normalize-space(text())='Columns']"):
                click(driver, By, "//*[normalize-space(text())='changed_params']")
                driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
            if name == "2-compare":
                if not click(driver, By, "//*[contains(text(), 'Show diff only')]"):
                    print("  (no 'Show diff only' toggle found on the compare page)")
                heading = driver.find_elements(By.XPATH, "//*[normalize-space(text())='Parameters']")
                if heading:
                    driver.execute_script("arguments[0].scrollIntoView();", heading[-1])
            if name == "2-compare":  # down to the artifacts: both runs' confusion matrices side by side
                driver.set_window_size(1600, 3000)
                if not click(driver, By, "//*[normalize-space(text())='confusion.png']"):
                    print("  (no confusion.png among the compare page's artifacts)")
            if name == "6-dvc-plots-diff":
                height = driver.execute_script("return document.body.scrollHeight")
                driver.set_window_size(1600, min(max(height, 1100), 4000))
            time.sleep(wait / 3)
            path = args.out / f"{name}.png"
            driver.save_screenshot(str(path))
            driver.set_window_size(1600, 1100)
            print(path)
    finally:
        if driver is not None:
            driver.quit()
        os.killpg(ui.pid, signal.SIGTERM)  # the server and the job workers it started
        ui.wait(timeout=30)
    return 0


if __name__ == "__main__":
    main()
