"""The operator's console (/ui) in a real headless Chromium (Debian's chromium and chromedriver, driven by
Selenium): login with an admin key only, each tier's arm, value and value-versus-N curve, spend against
caps, requests with their N completions, training runs, rollback and revocation through the page's
buttons (CSRF-protected POSTs). A screenshot of every page is written under the test's tmp path."""
from __future__ import annotations

import asyncio
import os
import re
import shutil
from pathlib import Path

import httpx
import pytest

from gateway.config import hash_key
from gateway.trainer import train_routes
from sandbox.demo import replay_route, replay_upstream
from sandbox.replay import problem_text
from tests.support import wait_for

ADMIN, CALLER, FREE = "ui-admin-secret", "ui-caller-secret", "ui-free-secret"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def ui_config(replay, math_env) -> dict:
    return {
        "upstreams": {"replay-math": replay_upstream(replay.url, "replay-math")},
        "routes": [replay_route("math", "replay-math", math_env, base_url=replay.url, env_name="replay-math",
                                start={"default": {"prompt": "p4", "n": 3}})],
        "tiers": [{"name": "team", "cost_weight": 0.0, "caps": {"per_day": {"dollars": 5.0}},
                   "key_caps": {"per_day": {"dollars": 2.0}}},
                  {"name": "free", "cost_weight": 5.0, "max_n": 8, "caps": {"per_day": {"dollars": 1.0}}}],
        "api_keys": [{"hash": hash_key(CALLER), "tier": "team", "name": "team-app"},
                     {"hash": hash_key(FREE), "tier": "free", "name": "free-app"}],
        "admin_keys": [{"hash": hash_key(ADMIN), "name": "ops-alice"}],
        "train": {"budget": 600, "min_queries": 10},
    }


def ask(gw, key: str, q: int = 1) -> httpx.Response:
    return httpx.post(f"{gw.url}/v1/chat/completions", headers={"authorization": f"Bearer {key}"}, timeout=30,
                      json={"model": "math", "messages": [{"role": "user", "content": problem_text(q)}]})


@pytest.fixture(scope="module")
def shots(tmp_path_factory, request):
    folder = tmp_path_factory.mktemp("ui-screenshots")
    yield folder
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if capture is not None:
        with capture.global_and_fixture_disabled():  # printed even under capture, for the reviewer
            print(f"\nconsole screenshots: {folder}")
    else:
        print(f"\nconsole screenshots: {folder}")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Debian's Chromium, headless, through Debian's chromedriver; never a downloaded browser."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("selenium (pip install -e '.[test]')")
    if missing:
        message = f"browser tests need {missing} (Debian packages chromium, chromium-driver; .ci/run installs them)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1200,800", "--hide-scrollbars",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    # with the driver's path given, Selenium Manager (which could download a driver or browser) never runs
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    driver.implicitly_wait(5)  # lookups wait for the page a click navigated to
    yield driver
    driver.quit()


class Page:
    """The browser on one gateway: navigation, screenshots of whole pages, element lookups."""

    def __init__(self, driver, url: str, shots: Path) -> None:
        self.driver, self.url, self.shots = driver, url, shots
        driver.delete_all_cookies()

    def open(self, path: str) -> str:
        self.driver.get(self.url + path)
        return self.driver.current_url.removeprefix(self.url)

    def text(self) -> str:
        return self.driver.find_element("tag name", "body").text

    def all(self, css: str):
        return self.driver.find_elements("css selector", css)

    def one(self, css: str):
        return self.driver.find_element("css selector", css)

    def shot(self, name: str, height: int | None = None) -> Path:
        """A PNG of the whole page (or its top `height` pixels), through the DevTools protocol."""
        import base64

        size = self.driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
        data = self.driver.execute_cdp_cmd("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": size["width"], "height": height or size["height"], "scale": 1}})["data"]
        path = self.shots / f"{name}.png"
        path.write_bytes(base64.b64decode(data))
        return path

    def login(self, key: str) -> None:
        assert self.open("/ui").startswith("/ui/login")
        self.one("#key").send_keys(key)
        self.one("#login").click()
        # the next navigation must not race the form's POST (its response sets the session cookie)
        wait_for(lambda: "/ui/login" not in self.driver.current_url)


def test_only_admin_keys_get_in_and_every_post_needs_the_csrf_token(start_gateway, replay, math_env, browser, shots):
    gw = start_gateway(ui_config(replay, math_env))
    page = Page(browser, gw.url, shots)
    # anonymous: a browser is sent to the login page, other clients get a 401
    assert page.open("/ui/spend") == "/ui/login?next=/ui/spend"
    page.shot("login")
    assert httpx.get(f"{gw.url}/ui").status_code == 401
    # a caller key cannot log in: 403 and no session cookie
    page.one("#key").send_keys(CALLER)
    page.one("#login").click()
    assert "caller's key" in page.one("#error").text and not browser.get_cookies()
    r = httpx.get(f"{gw.url}/ui", headers={"authorization": f"Bearer {CALLER}"})
    assert r.status_code == 403 and "set-cookie" not in r.headers
    assert httpx.get(f"{gw.url}/ui", headers={"authorization": "Bearer nope"}).status_code == 401
    # the admin key: a signed HttpOnly, SameSite=Strict cookie that holds neither the key nor its hash
    page.one("#key").clear()
    page.one("#key").send_keys(ADMIN)
    page.one("#login").click()
    wait_for(lambda: browser.current_url == f"{gw.url}/ui/spend")
    [cookie] = browser.get_cookies()
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/ui"
    assert ADMIN not in cookie["value"] and hash_key(ADMIN)[7:] not in cookie["value"]
    assert hash_key(ADMIN)[7:23] not in cookie["value"]
    # a session can also come from a bearer header; POSTs need its CSRF token and this origin
    with httpx.Client(base_url=gw.url, timeout=30) as client:
        r = client.get("/ui/policies", headers={"authorization": f"Bearer {ADMIN}"})
        assert r.status_code == 200 and "HttpOnly" in r.headers["set-cookie"]
        token = re.search(r'name="csrf_token" value="([^"]+)"', r.text).group(1)
        assert client.post("/ui/policies/rollback", data={"version": "0"}).status_code == 403
        assert client.post("/ui/policies/rollback", data={"version": "0", "csrf_token": "x" + token}).status_code == 403
        assert client.post("/ui/policies/rollback", data={"version": "0", "csrf_token": token},
                           headers={"origin": "https://evil.example"}).status_code == 403
        assert client.get("/admin/policies", headers={"authorization": f"Bearer {ADMIN}"}).json()["latest"] == 0
        r = client.post("/ui/policies/rollback", data={"version": "0", "csrf_token": token})
        assert r.status_code == 303 and r.headers["location"].startswith("/ui/policies?rolled_back=1")
        # a cookie without the signature's secret is refused
        client.cookies.set("iapo_ui_session", client.cookies["iapo_ui_session"][:-2] + "xx", path="/ui")
        assert client.get("/ui").status_code == 401
    # logging out ends the session
    page.open("/ui")
    page.one("header form button").click()
    wait_for(lambda: "/ui/login" in browser.current_url)
    assert page.open("/ui").startswith("/ui/login")


def test_the_console_shows_the_trained_policy_and_its_buttons_change_what_is_served(
        start_gateway, replay, math_env, browser, shots):
    gw = start_gateway(ui_config(replay, math_env))
    for q in range(12):
        assert ask(gw, CALLER, q).status_code == 200
        assert ask(gw, FREE, q).status_code == 200
    answered = ask(gw, FREE, 3).json()  # at the start arm: N = 3 completions and their votes
    gw.gateway.writer.flush()
    [report] = asyncio.run(train_routes(gw.settings))
    assert report.status == "published", report.message
    wait_for(lambda: ask(gw, CALLER).headers["x-iapo-policy-version"] == str(report.version))
    view = httpx.get(f"{gw.url}/admin/policies/latest", headers={"authorization": f"Bearer {ADMIN}"}).json()

    page = Page(browser, gw.url, shots)
    page.login(ADMIN)
    # overview: each tier's arm, value ± s.e., and a value-versus-N chart of its top prompts
    assert page.open("/ui") == "/ui"
    for entry in view["entries"]:
        card = page.one(f"#tier-math-{entry['tier']}")
        assert f"{entry['prompt_id']} · N={entry['n']}" in card.text
        assert f"{entry['value']:.3f} ± {entry['value_se']:.3f}" in card.text
        svg = card.find_element("css selector", "svg.curve")
        assert svg.find_elements("css selector", "polyline") and svg.find_elements("css selector", "circle.served")
        legend = [t.text for t in svg.find_elements("css selector", "text.legend")]
        assert entry["prompt_id"] in legend and len(legend) >= 2  # top prompts, the served one among them
        assert card.find_elements("css selector", "table.ranked tr.served")
        assert f"Curves from training run {report.run_id}" in card.text
    page.shot("overview")
    page.shot("overview-1200x800", height=800)  # the README's docs/console.png
    # training: the run, its budget spent and its trajectory
    page.open("/ui/training")
    run = page.one(f"#run-{report.run_id}")
    assert "published" in run.text and f"{report.completions} / 600 completions" in run.text
    assert run.find_elements("css selector", "svg.trajectory polyline")
    page.shot("training")
    # spend against caps: tier and key caps with the share used and reset times
    page.open("/ui/spend")
    rows = {(r.get_attribute("data-scope"), r.get_attribute("data-name")): r for r in page.all("tr.cap")}
    assert {("tier", "team"), ("tier", "free"), ("key", "team-app")} <= set(rows)
    for row in rows.values():
        assert re.search(r"\d+\.\d%", row.find_element("css selector", ".used").text)
        assert re.search(r"UTC\s+in \d", row.find_element("css selector", ".resets").text)
    page.shot("spend")
    # recent requests, then one with its N completions, the votes, and the one returned
    page.open("/ui/requests?route=math&tier=free")
    page.shot("requests")
    page.one(f'a[href="/ui/requests/{answered["id"]}"]').click()
    completions = page.all("tr.completion")
    assert len(completions) == answered["iapo"]["n"]
    [chosen] = page.all("tr.completion.chosen")
    assert "returned" in chosen.text and answered["iapo"]["answer"] in chosen.text
    assert page.all("#votes tr.chosen")
    page.shot("request")
    # rollback to version 0 through its button: the gateway serves the new version (the start arm)
    page.open("/ui/policies")
    page.shot("policies")
    page.one("#rollback-0").click()
    assert "Rolled back" in page.one("#flash").text
    new = str(report.version + 1)
    wait_for(lambda: ask(gw, CALLER).headers["x-iapo-policy-version"] == new)
    assert ask(gw, CALLER).headers["x-iapo-n"] == "3"
    page.open("/ui")
    assert "p4 · N=3" in page.one("#tier-math-team").text and "start arm" in page.one("#tier-math-team").text
    page.open("/ui/policies")
    assert not page.all(f"#rollback-{new}") and page.all(f"#rollback-{report.version}")
    page.shot("policies-after-rollback")
    # a key made with the form shows its secret once; revoking it through its button takes at once
    page.open("/ui/keys")
    page.one('input[name="name"]').send_keys("ci-bot")
    page.one("#create-key").click()
    secret = page.one("#secret").text
    assert secret.startswith("iapo-") and ask(gw, secret).status_code == 200
    page.open("/ui/keys")
    assert secret not in browser.page_source
    row = next(r for r in page.all("tr.key") if r.get_attribute("data-name") == "ci-bot")
    row.find_element("css selector", "button").click()
    assert "Revoked key" in page.one("#flash").text
    page.shot("keys")
    wait_for(lambda: ask(gw, secret).status_code == 401, timeout=5)
    # every action is in the audit log under the admin key's name; no secret anywhere
    page.open("/ui/audit")
    actions = [r.text for r in page.all("#actions tr")[1:]]
    assert [a.split()[3:5] for a in actions[:4]] == [["ops-alice", "key.revoke"], ["ops-alice", "key.create"],
                                                    ["ops-alice", "policy.rollback"], ["ops-alice", "ui.login"]]
    assert secret not in browser.page_source and ADMIN not in browser.page_source
    page.shot("audit")
