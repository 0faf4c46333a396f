"""`nlakit serve` in a real browser: headless Chromium (Debian's chromium + chromium-driver)
driven by Selenium against a real server on 127.0.0.1. Without Chromium these tests FAIL
with the install command; they never skip."""

import httpx
import pytest

from nlakit import NLAError
from nlakit.apps.serve import BackgroundServer, ServeLimits, create_app
from nlakit.apps.serve.browser import chrome_driver, explain_flow, find_chromium
from nlakit.apps.serve.testing import SAMPLE_TEXT, tiny_viewer_nla, with_explanations, write_run

pytestmark = pytest.mark.usefixtures("private_cache")

LIMITS = ServeLimits(max_new_tokens=8, default_new_tokens=6)
HOSTILE = ("<script>document.title='pwned'</script>"
           "<img src=x onerror=\"document.title='pwned-img'\"> & \"quotes\"")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """A headless Chromium, or the NLAError saying how to install it (each test then FAILS
    with that message: a missing browser is a failure, never a skip)."""
    try:
        find_chromium()
    except NLAError as e:
        yield e
        return
    d = chrome_driver(tmp_path_factory.mktemp("chromium-profile"))
    yield d
    d.quit()


def need(browser):
    """The driver; called in the test body so that a missing Chromium is a test FAILURE."""
    if isinstance(browser, NLAError):
        pytest.fail(str(browser), pytrace=False)
    return browser


def test_explain_page_shows_the_apis_explanations(browser, tiny, tmp_path):
    driver = need(browser)
    nla = tiny_viewer_nla(tiny, 2, rawvar=0.5)
    app = create_app(nla, limits=LIMITS, chunk=4)
    with BackgroundServer(app) as url:
        shot = tmp_path / "explain.png"
        res = explain_flow(driver, url, SAMPLE_TEXT, click=-3, screenshot=shot)
        job = httpx.get(f"{url}/api/jobs/{res.job_id}").json()
    results = job["result"]["results"]
    assert job["status"] == "done" and res.n_tokens == len(results) == job["total"]
    clicked = results[res.position]
    assert res.shown_explanation == clicked["explanation"] != ""
    assert res.token == clicked["token"]
    assert res.shown_explanations == {r["position"]: r["explanation"] for r in results}
    assert res.shown_claims == (clicked["verification"] or "(no checkable claim)")
    assert res.status.startswith("done")
    assert not res.console_errors, res.console_errors
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


def test_hostile_model_output_is_shown_as_text_never_run(browser, tiny, tiny_store, tmp_path):
    from selenium.webdriver.common.by import By

    driver = need(browser)

    nla = with_explanations(tiny_viewer_nla(tiny, tiny_store.layer), HOSTILE)
    run = write_run(nla, tiny_store, tmp_path / "run")
    app = create_app(nla, acts=tiny_store.path, eval_dir=run, limits=LIMITS)
    with BackgroundServer(app) as url:
        res = explain_flow(driver, url, "x = 1", click=-1)
        assert res.shown_explanation == HOSTILE  # the literal text, visible as text
        assert "pwned" not in res.title
        assert not driver.find_elements(By.CSS_SELECTOR, "#detail img, #tokens img")
        driver.get(f"{url}/browse")
        cell = driver.find_element(By.CSS_SELECTOR, "#rows tbody td.expl")
        assert cell.text == HOSTILE
        assert "pwned" not in driver.title
        assert len(driver.find_elements(By.TAG_NAME, "script")) == 1  # /static/app.js only
        assert not driver.find_elements(By.CSS_SELECTOR, "#rows img")


def test_row_edits_and_reconstruct_pages_show_the_apis_numbers(browser, tiny, tiny_store,
                                                               tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = need(browser)
    nla = tiny_viewer_nla(tiny, tiny_store.layer, rawvar=tiny_store.stats()["rawvar"])
    run = write_run(nla, tiny_store, tmp_path / "run")
    app = create_app(nla, acts=tiny_store.path, eval_dir=run, limits=LIMITS)
    wait = WebDriverWait(driver, 60)
    with BackgroundServer(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        rid = c.get("/api/rows").json()["rows"][0]["row_id"]
        driver.get(f"{url}/browse/rows/{rid}")
        driver.find_element(By.ID, "run-edits").click()
        wait.until(lambda d: d.find_element(By.ID, "edits").is_displayed())
        api = c.post(f"/api/rows/{rid}/edits", json={}).json()
        cells = [[td.text for td in tr.find_elements(By.TAG_NAME, "td")]
                 for tr in driver.find_elements(By.CSS_SELECTOR, "#edits tbody tr")]
        assert [r[0] for r in cells] == [e["edit"] for e in api["edits"]]
        assert [r[2] for r in cells] == [e["text"] for e in api["edits"]]

        driver.get(f"{url}/reconstruct?row_id={rid}")
        box = driver.find_element(By.ID, "r-explanation")
        box.clear()
        box.send_keys("an assignment to a name")  # scores follow the typing
        want = c.post("/api/reconstruct", json={"explanation": "an assignment to a name",
                                                "row_id": rid}).json()
        wait.until(lambda d: d.find_element(By.ID, "r-cos").text == f"{want['cos']:+.3f}")
        assert driver.find_element(By.ID, "r-fve").text == f"{want['fve_nrm']:+.3f}"
        assert driver.find_element(By.ID, "r-status").text == f"against row {rid}"


def test_chat_mode_renders_turns_with_the_chat_template(browser, tiny):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = need(browser)
    app = create_app(tiny_viewer_nla(tiny, 2), limits=LIMITS)
    with BackgroundServer(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        driver.get(url + "/")
        driver.find_element(By.ID, "mode-chat").click()
        turns = driver.find_elements(By.CSS_SELECTOR, "#turns .turn")
        msgs = [{"role": t.find_element(By.TAG_NAME, "select").get_attribute("value"),
                 "content": t.find_element(By.TAG_NAME, "textarea").get_attribute("value")}
                for t in turns]
        assert [m["role"] for m in msgs] == ["user", "assistant"]
        driver.find_element(By.ID, "tokenize").click()
        WebDriverWait(driver, 60).until(
            lambda d: d.find_element(By.ID, "status").get_attribute("data-state") == "tokenized")
        shown = driver.execute_script(
            "return Array.from(document.querySelectorAll('#tokens .tok')).map(s => s.dataset.pos)")
        api = c.post("/api/tokenize", json={"messages": msgs}).json()
        assert len(shown) == api["n_tokens"] and "<|im_start|>assistant" in api["text"]
