"""Driving the viewer in headless Chromium (Selenium): the browser test and the README
screenshot run this same code.

Needs Debian's `chromium` and `chromium-driver` packages (``apt-get install -y chromium
chromium-driver``); `find_chromium` says what is missing and how to install it.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from nlakit.errors import NLAError

INSTALL = "apt-get update && apt-get install -y chromium chromium-driver"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage")


def find_chromium() -> tuple[str, str]:
    """(chromium binary, chromedriver binary), or an NLAError naming the install command."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        missing = [n for n, p in (("chromium", browser), ("chromedriver", driver)) if not p]
        raise NLAError(f"{' and '.join(missing)} not found on PATH; the viewer's browser test "
                       f"needs Debian's chromium and chromium-driver: run `{INSTALL}` (as root)")
    return browser, driver


def chrome_driver(user_data_dir: str | Path | None = None, *, width: int = 1280,
                  height: int = 900):
    """A headless Chromium WebDriver with a fresh profile directory (no network extras)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = find_chromium()
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for f in CHROMIUM_FLAGS:
        opts.add_argument(f)
    profile = Path(user_data_dir or tempfile.mkdtemp(prefix="nlakit-chromium-"))
    opts.add_argument(f"--user-data-dir={profile}")
    opts.add_argument(f"--window-size={width},{height}")
    return webdriver.Chrome(service=Service(executable_path=driver), options=opts)


@dataclass
class ExplainFlowResult:
    job_id: str
    n_tokens: int
    position: int  # the clicked token
    token: str  # the clicked token as the page shows it
    shown_explanation: str  # the explanation text the page shows for it
    shown_explanations: dict  # {position: explanation} of every token (title attribute)
    shown_claims: str  # the claim checks the page shows for the clicked token
    status: str  # the progress line when done
    screenshot: Path | None
    title: str  # document.title at the end (a script injected by model output would show)
    console_errors: list


def explain_flow(driver, url: str, text: str, *, click: int = -1, max_new_tokens: int | None
                 = None, timeout: float = 120.0, screenshot: str | Path | None = None
                 ) -> ExplainFlowResult:
    """Open the Explain page, submit `text`, run "Explain all tokens", wait until every token
    is explained, click token `click` (negative counts from the end), read what the page
    shows, and save a screenshot (PNG) when asked."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, timeout)
    driver.get(url.rstrip("/") + "/")
    box = wait.until(ec.presence_of_element_located((By.ID, "text")))
    box.clear()
    box.send_keys(text)
    if max_new_tokens is not None:
        field = driver.find_element(By.ID, "max-new")
        field.clear()
        field.send_keys(str(max_new_tokens))
    driver.find_element(By.ID, "tokenize").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#tokens .tok"))
    n = len(driver.find_elements(By.CSS_SELECTOR, "#tokens .tok"))
    driver.find_element(By.ID, "explain-all").click()
    wait.until(lambda d: d.find_element(By.ID, "status").get_attribute("data-state")
               in ("done", "error"))
    status = driver.find_element(By.ID, "status")
    if status.get_attribute("data-state") == "error":
        raise NLAError(f"the Explain page reported an error: {status.text}")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, '#tokens .tok[data-explained="yes"]'))
               == n)
    pos = click + n if click < 0 else click
    tok = driver.find_element(By.CSS_SELECTOR, f'#tokens .tok[data-pos="{pos}"]')
    tok.click()
    wait.until(lambda d: d.find_element(By.ID, "d-explanation").get_attribute("data-ready")
               == "yes")
    shown = driver.execute_script("return document.getElementById('d-explanation').textContent")
    titles = driver.execute_script(
        "return Array.from(document.querySelectorAll('#tokens .tok')).map("
        "s => [parseInt(s.dataset.pos), s.title])")
    token = driver.execute_script("return document.getElementById('d-token').textContent")
    claims = driver.execute_script("return document.getElementById('d-claims').textContent")
    job_id = driver.find_element(By.ID, "tokens").get_attribute("data-job")
    shot = None
    if screenshot is not None:
        shot = Path(screenshot)
        shot.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(shot))
    try:
        logs = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
    except Exception:  # not every driver offers logs
        logs = []
    return ExplainFlowResult(job_id=job_id, n_tokens=n, position=pos, token=token,
                             shown_explanation=shown,
                             shown_explanations={int(p): t for p, t in titles},
                             shown_claims=claims,
                             status=status.text, screenshot=shot, title=driver.title,
                             console_errors=logs)
