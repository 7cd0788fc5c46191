"""The dashboard in a real headless Chromium (Debian's chromium + chromedriver, driven by selenium).

One browser for the whole module. The page is served by a real `autoresearch dashboard` process
over a workspace that the real daemon filled (fixture workload, scripted proposals with HTML and
script in a description and in a run's output); the live test runs a real daemon process and
waits for its events to appear on the open page without a reload.

DASHBOARD_SCREENSHOT=docs/dashboard.png regenerates the README's screenshot.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import time
from pathlib import Path

import pytest

from autoresearch.clock import parse_utc
from dashboard_fixtures import XSS, Dashboard, build_lab
from daemon_fixtures import spawn_daemon, state, wait_for

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
webdriver = pytest.importorskip("selenium.webdriver")
if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
    pytest.skip("needs Debian's chromium and chromium-driver (.ci/run installs them)", allow_module_level=True)

from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium')}", "--window-size=1400,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    return build_lab(tmp_path_factory.mktemp("dashb") / "lab")


@pytest.fixture(scope="module")
def dash(lab):
    d = Dashboard(lab)
    yield d
    d.stop()


def until(driver, predicate, timeout=10.0):
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: predicate(d))


def text_of(driver, element_id: str) -> str | None:
    """An element's text, read in one step (the page redraws parts of itself as events come)."""
    return driver.execute_script("const e = document.getElementById(arguments[0]); return e && e.textContent",
                                 element_id)


def open_page(browser, dash, fragment=""):
    browser.get(dash.url + fragment)
    until(browser, lambda d: d.execute_script("return document.getElementById('live').textContent") == "live")
    until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#experiments tbody tr"))


def test_page_loads_with_header(browser, dash, lab):
    open_page(browser, dash)
    st = state(lab)
    assert browser.find_element(By.ID, "daemon-state").text == "stopped"
    assert browser.find_element(By.ID, "best").text.startswith(f"{st.best_metric:.6f}")
    assert browser.find_element(By.ID, "keep-rate").text == "40.0% (2 / 5)"
    assert browser.find_element(By.ID, "seq").text == str(st.seq)
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []


def test_chart_has_one_point_per_experiment(browser, dash, lab):
    open_page(browser, dash)
    st = state(lab)
    points = browser.find_elements(By.CSS_SELECTOR, "#chart-svg .pt")
    assert sorted(int(p.get_attribute("data-n")) for p in points) == sorted(st.experiments)
    crashed = browser.find_elements(By.CSS_SELECTOR, "#chart-svg .pt.failed")
    assert [p.get_attribute("data-n") for p in crashed] == ["3"]
    assert browser.find_element(By.CSS_SELECTOR, "#chart-svg path.best").get_attribute("d").startswith("M")
    # Hover shows the description (as text).
    target = browser.find_element(By.CSS_SELECTOR, '#chart-svg .pt[data-n="2"]')
    webdriver.ActionChains(browser).move_to_element(target).perform()
    tip = browser.find_element(By.ID, "tooltip")
    until(browser, lambda d: tip.is_displayed())
    assert "WIDTH 64 -> 40 <script>" in tip.text
    # Zoom: drag across part of the chart; fewer experiments are in view, a reset brings all back.
    chart = browser.find_element(By.ID, "chart-svg")
    webdriver.ActionChains(browser).move_to_element_with_offset(chart, -300, 0).click_and_hold() \
        .move_by_offset(250, 0).release().perform()
    until(browser, lambda d: d.find_element(By.ID, "zoom-reset").is_displayed())
    browser.find_element(By.ID, "zoom-reset").click()
    until(browser, lambda d: not d.find_element(By.ID, "zoom-reset").is_displayed())


def test_table_filters_and_sorts(browser, dash):
    open_page(browser, dash)
    rows = lambda: browser.find_elements(By.CSS_SELECTOR, "#experiments tbody tr")  # noqa: E731
    assert len(rows()) == 6
    browser.find_element(By.CSS_SELECTOR, '#filters button[data-filter="crashed"]').click()
    assert [(r.get_attribute("data-n"), r.get_attribute("data-state")) for r in rows()] == [("3", "crashed")]
    browser.find_element(By.CSS_SELECTOR, '#filters button[data-filter="kept"]').click()
    assert sorted(r.get_attribute("data-n") for r in rows()) == ["0", "1", "4"]
    browser.find_element(By.CSS_SELECTOR, '#filters button[data-filter="all"]').click()
    browser.find_element(By.CSS_SELECTOR, '#experiments th[data-key="metric"]').click()
    metrics = [r.find_elements(By.TAG_NAME, "td")[2].text for r in rows()]
    finite = [float(m) for m in metrics if m != "-"]
    assert finite == sorted(finite) and metrics[-1] == "-"  # ascending, the crash (no metric) last


def test_experiment_page_shows_its_diff_log_and_events(browser, dash):
    open_page(browser, dash, "#/exp/2")
    until(browser, lambda d: d.find_element(By.ID, "experiment").get_attribute("data-n") == "2")
    added = browser.find_elements(By.CSS_SELECTOR, "#diff .dadd")
    assert any("WIDTH = 40" in a.text for a in added)
    assert any("WIDTH = 64" in r.text for r in browser.find_elements(By.CSS_SELECTOR, "#diff .ddel"))
    assert browser.find_elements(By.CSS_SELECTOR, "#diff .dadd span.mi")  # the number, highlighted
    log = browser.find_element(By.ID, "log").text
    assert "warning <b>bold</b> <script>window.__pwned = 1</script>" in log and "\x1b" not in log
    triggers = [r.find_elements(By.TAG_NAME, "td")[2].text
                for r in browser.find_elements(By.CSS_SELECTOR, "#exp-events tbody tr")]
    assert triggers == ["start", "proposed", "commit", "launch", "finish", "discard"]


def test_agent_text_and_run_output_are_escaped_everywhere(browser, dash):
    open_page(browser, dash)
    desc = browser.find_element(By.CSS_SELECTOR, '#experiments tbody tr[data-n="2"] td.desc').text
    assert desc == "WIDTH 64 -> 40 " + XSS
    open_page(browser, dash, "#/exp/2")
    until(browser, lambda d: d.find_element(By.ID, "experiment").get_attribute("data-n") == "2")
    assert browser.find_element(By.ID, "exp-description").text.endswith(XSS)
    assert browser.execute_script("return window.__pwned === undefined")
    assert browser.find_elements(By.CSS_SELECTOR, "#main script, #main img, #main b") == []


def test_running_daemon_event_appears_without_reload_within_2s(browser, lab, dash, tmp_path):
    mode = tmp_path / "mode"
    mode.write_text("sleep:2.5")  # runs take a while: the daemon is running while we watch
    daemon = spawn_daemon(lab, "--max-experiments", "4", env={"AUTORESEARCH_TEST_MODE": str(mode)})
    try:
        open_page(browser, dash)
        browser.execute_script("window.__sameDocument = 42")
        until(browser, lambda d: text_of(d, "daemon-state") not in (None, "stopped", "down"), 30)
        db = sqlite3.connect(f"file:{lab / '.autoresearch' / 'events.sqlite'}?mode=ro", uri=True)
        latencies = []
        for _ in range(3):  # several events, each timed from its own recorded time
            seq = db.execute("SELECT max(seq) FROM events").fetchone()[0]
            row = wait_for(lambda: db.execute("SELECT seq, time FROM events WHERE seq > ? ORDER BY seq LIMIT 1",
                                              [seq]).fetchone(), timeout=30, interval=0.01)
            written = parse_utc(row[1])
            until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, f'#events li[data-seq="{row[0]}"]'), 5)
            latencies.append(time.time() - written)
        db.close()
        print("event -> page latencies (s):", [round(x, 3) for x in latencies])
        assert max(latencies) <= 2.0
        assert browser.execute_script("return window.__sameDocument") == 42  # no reload happened
        slot = until(browser, lambda d: d.execute_script(
            "const s = document.querySelector('#slots .slot'); return s && s.dataset.slot"), 30)
        assert slot.isdigit()
        shot = tmp_path / "dashboard.png"
        browser.save_screenshot(str(shot))
        if os.environ.get("DASHBOARD_SCREENSHOT"):
            shutil.copy(shot, os.environ["DASHBOARD_SCREENSHOT"])
        assert daemon.wait(timeout=60) == 0
        until(browser, lambda d: text_of(d, "daemon-state") == "stopped", 10)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
