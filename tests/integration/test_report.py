"""What a user sees after a run, checked in a real headless browser (Debian's chromium, Selenium):
the report page, and the MLflow UI that `genpipe ui` starts; plus what the tracking store holds.

They read the every-family colour run (conftest's `colour_run`: the project's first flow run, one
epoch of every family on 3x32x32 shapes), which test_colour_pipeline.py checks too.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import PROJECT_ROOT, free_port, http_ok, wait_until
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from components.models import list_models
from components.registry.store import resolve_tracking_uri
from components.registry.tracking import (
    EXPERIMENT_KIND_TAG,
    MODEL_TRAINING,
    PROGRESS_SAMPLES_KEY,
    SAMPLES_ARTIFACT,
    ui_model_url,
)
from components.registry.versions import CHAMPION
from flows.cli import app
from flows.retrain import REPORT_ARTIFACT

pytestmark = pytest.mark.integration

MODEL = "vae"
NAME = f"shapes32.{MODEL}"
AS_FROM_A_TERMINAL = (
    "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "sys.argv[0] = 'genpipe'; runpy.run_module('flows.cli', run_name='__main__')"
)
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
# Without the background-networking flags chromium keeps trying to reach Google's services.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1000",
)


@pytest.fixture(scope="module")
def trained_project(colour_run) -> Path:
    return colour_run[0]


@pytest.fixture(scope="module")
def client(trained_project) -> MlflowClient:
    uri = resolve_tracking_uri(None, trained_project)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for binary in (CHROMIUM, CHROMEDRIVER):
        assert binary.is_file(), f"{binary} missing: `make browser` installs Debian's chromium and its driver"
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    profile = tempfile.mkdtemp(prefix="genpipe-chromium-")
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    driver.set_page_load_timeout(120)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def screenshot(driver, path: Path) -> Path:
    """The whole page, not only the window: the window is made as tall as the page first."""
    height = driver.execute_script(
        "return Math.max(document.body.scrollHeight, document.documentElement.scrollHeight)"
    )
    driver.set_window_size(1400, min(max(height, 600) + 200, 5000))  # the window's frame takes some of it
    driver.save_screenshot(str(path))
    return path


def body_text(driver) -> str:
    return driver.find_element("tag name", "body").text


def model_run(client: MlflowClient):
    champion = client.get_model_version_by_alias(NAME, CHAMPION)
    return champion, client.get_run(champion.run_id)


def test_experiment_is_model_training_with_system_metrics_and_described_versions(client):
    experiment = client.get_experiment_by_name("genpipe")
    assert experiment.tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING
    champion, run = model_run(client)
    for metric in ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"):
        assert metric in run.data.metrics, sorted(run.data.metrics)
    assert run.data.metrics["system/system_memory_usage_megabytes"] > 0
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    steps = [
        p for p in images if p.startswith(f"images/{PROGRESS_SAMPLES_KEY}+step+1+") and p.endswith(".png")
    ]
    assert len(steps) == 1, images  # one epoch: its grid at step 1
    first, second = champion.description.split("\n\n")
    assert f"**{MODEL}**" in first and champion.tags["data_version"][:12] in first
    # The 8-bit VAE is promoted on its bound in bits per dimension, as the literature compares.
    assert "NLL bound" in first and "bits/dim (validation split)" in first
    assert second.startswith("Promoted to champion: first version")
    assert f"runs/{run.info.run_id}/artifactPath/{SAMPLES_ARTIFACT}" in second


def test_report_page_shows_every_family_with_loaded_pictures(trained_project, client, browser, tmp_path):
    output = tmp_path / "report.html"
    result = CliRunner().invoke(app, ["report", "-o", str(output), "-C", str(trained_project)])
    assert result.exit_code == 0, result.output
    page = output.read_text()
    assert re.findall(r'(?:src|href)="(?!data:)[^"]*"', page) == []  # everything embedded: no network
    browser.get(output.as_uri())
    rows = browser.find_elements("css selector", "table tr.family-row")
    families = list_models()
    assert sorted(row.get_attribute("data-family") for row in rows) == sorted(families)
    images = browser.find_elements("tag name", "img")
    assert len(images) == 2 * len(families)  # each champion's samples and the real test images
    widths = browser.execute_script("return [...document.images].map(i => i.complete ? i.naturalWidth : 0)")
    assert all(width > 0 for width in widths), widths
    # Each family's score, ringed as the champion's.
    assert len(browser.find_elements("css selector", "svg.chart circle")) >= 2 * len(families)
    screenshot(browser, tmp_path / "report.png")

    parent = client.search_runs(
        [client.get_experiment_by_name("genpipe").experiment_id], "tags.mlflow.runName LIKE 'retrain-%'"
    )[0]
    logged = Path(client.download_artifacts(parent.info.run_id, REPORT_ARTIFACT, str(tmp_path)))
    assert all(f'data-family="{family}"' in logged.read_text() for family in families)
    assert "data:image/png;base64," in logged.read_text()


def test_genpipe_ui_opens_on_the_runs_and_shows_the_champion(trained_project, client, browser, tmp_path):
    port = free_port()
    # `flows.cli` from the checkout runs this code, whatever `genpipe` is installed. Ctrl-C reaches it
    # as in a terminal: a process inherits an ignored SIGINT (Python then raises no KeyboardInterrupt),
    # and the suite's process has been seen to ignore it after other tests.
    ui = subprocess.Popen(
        [sys.executable, "-c", AS_FROM_A_TERMINAL, "ui", "--port", str(port), "-C", str(trained_project)],
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        printed = ""
        for line in ui.stdout:  # the URL is printed once the server answers; EOF if it failed
            printed += line
            if "MLflow UI:" in line:
                break
        match = re.search(r"MLflow UI:\s+(http://\S+)", printed)
        assert match, f"no URL printed: {printed!r}"
        url, base = match.group(1), f"http://127.0.0.1:{port}"
        assert url.startswith(f"{base}/#/experiments/") and "workflowType=machine_learning" in url

        browser.get(url)
        pipeline = wait_until(lambda: browser.find_elements("partial link text", "retrain-"), 120, "runs", 1)
        assert "/runs" in browser.current_url, browser.current_url
        assert "Detect Issues" not in browser.page_source  # the GenAI overview's pop-up
        # The model runs are nested under the pipeline's run: its row's button unfolds them.
        pipeline[0].find_element(
            "xpath", "./ancestor::*[contains(@class, 'ag-cell-value')][1]//button"
        ).click()
        wait_until(
            lambda: browser.find_elements("link text", MODEL), 60, "the model run under the pipeline run", 1
        )
        screenshot(browser, tmp_path / "mlflow-runs.png")

        browser.get(ui_model_url(base, NAME))
        wait_until(lambda: re.search(r"@\s*champion\b", body_text(browser)), 90, "the champion alias", 1)
        screenshot(browser, tmp_path / "mlflow-model.png")
        browser.get(f"{base}/#/models/{NAME}/versions/1?workflowType=machine_learning")
        wait_until(lambda: "Promoted to champion" in body_text(browser), 90, "the version's description", 1)
        [grid_link] = browser.find_elements("link text", "Sample grid")
        assert grid_link.get_attribute("href").endswith(
            f"/artifactPath/{SAMPLES_ARTIFACT}?workflowType=machine_learning"
        )
    finally:
        ui.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            ui.wait(timeout=60)  # it gives each server 20 s to stop
        except subprocess.TimeoutExpired:
            ui.kill()
            ui.wait()
    assert ui.returncode == 0, (
        f"exit code {ui.returncode} after Ctrl-C; it printed:\n{ui.stdout.read()[-3000:]}"
    )
    assert not http_ok(f"http://127.0.0.1:{port}/health"), "genpipe ui left the MLflow server running"
