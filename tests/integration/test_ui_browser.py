"""The web dashboard in a real headless Chromium (Debian's, driven by Selenium) over a real
tokens-mode registry, broker and agent: alice signs in and goes through every page while
her sweep runs, cancels a task from its page and watches it turn cancelled without a
reload; bob, signed in after her, finds none of it. Each page's screenshot is saved under
test-artifacts/ui/ (git-ignored).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import pytest

from gc_client import Client, Executor
from gc_core.registry import identity
from gc_core.registry.db import open_database
from gc_core.registry_api.client import RegistryClient
from gc_core.registry_api.schemas import TokenIn
from tests.fabric import Endpoint
from tests.integration.conftest import OwnRegistry
from tests.integration.test_identities import AgentFabric

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support.select import Select  # noqa: E402
from selenium.webdriver.support.wait import WebDriverWait  # noqa: E402

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "ui"
#: Seconds a page may take to show what the fabric did (a generous bound, not a measure).
PATIENCE = 120
#: Tasks in alice's sweep.
SWEEP = 30


def sweep_step(seed: int) -> int:
    print(f"step {seed}")
    time.sleep(0.5)
    return seed * seed


def sleeps_long(seconds: float) -> None:
    time.sleep(seconds)


def fails_loudly(reason: str) -> None:
    print("about to fail")
    raise ValueError(reason)


@dataclass
class Stack:
    """The registry's URL, each user's token, alice's endpoint and her running work."""

    url: str
    tokens: dict[str, str]
    endpoint: Endpoint
    group: str
    sweep: list[Future[int]]
    long_task: Future[None]
    failed_task: Future[None]


@pytest.fixture(scope="module")
def stack(own_registry: OwnRegistry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp("ui-home")
    db_url = f"sqlite:///{home / 'registry.db'}"
    server, broker_url = own_registry(db_url, "tokens")
    with open_database(db_url)() as db:
        tokens = {}
        for user in ("alice", "bob"):
            identity.create_user(db, user)
            tokens[user] = identity.issue_token(db, user, label="browser tests").token
    as_alice = AgentFabric(broker_url=broker_url, registry_url=server.url, home=home, vhost="",
                           token=tokens["alice"])
    configured = as_alice.configure_endpoint("lab", workers=2, heartbeat_period=1.0)
    agent_token = RegistryClient(server.url, token=tokens["alice"]).issue_token(
        TokenIn(label="agent", endpoint_id=configured.endpoint_id)).token
    endpoint = Endpoint(AgentFabric(broker_url=broker_url, registry_url=server.url, home=home,
                                    vhost="", token=agent_token), "lab", configured.endpoint_id)
    endpoint.start()
    with Client(broker_url=broker_url, registry_url=server.url, home=str(home),
                token=tokens["alice"], user="alice") as client, \
            Executor(endpoint.endpoint_id, client=client) as ex:
        long_task = ex.submit(sleeps_long, 600)
        failed_task = ex.submit(fails_loudly, "the sample was empty")
        sweep = [ex.submit(sweep_step, seed) for seed in range(SWEEP)]
        yield Stack(server.url, tokens, endpoint, ex.task_group_id, sweep, long_task,
                    failed_task)
        ex.shutdown(wait=False, cancel_futures=True)
    endpoint.stop_all()


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        message = "no chromium/chromedriver: deploy/ensure-test-tools.sh installs them"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    options = Options()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu",
                     "--window-size=1360,900"):
        options.add_argument(argument)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    chrome = webdriver.Chrome(service=Service(driver), options=options)
    yield chrome
    chrome.quit()


def _sign_in(browser: WebDriver, stack: Stack, token: str) -> None:
    browser.delete_all_cookies()
    browser.get(f"{stack.url}/ui/login")
    browser.find_element(By.ID, "token").send_keys(token)
    browser.find_element(By.CSS_SELECTOR, "form button").click()


def _wait_for(browser: WebDriver, what: str, condition: object) -> None:
    WebDriverWait(browser, PATIENCE, poll_frequency=0.2).until(
        condition, message=f"waited {PATIENCE}s for {what}")  # type: ignore[arg-type]


# The live part of a page is replaced every few seconds, which makes an element found
# before a refresh stale after it: the page is read by one script at a time, which no
# refresh interrupts, and clicks are retried on a fresh element.


def _text(browser: WebDriver, element_id: str) -> str:
    """The text of the element with this id ("" when there is none)."""
    return str(browser.execute_script(
        "const e = document.getElementById(arguments[0]); return e ? e.innerText : '';",
        element_id))


def _cells(browser: WebDriver, rows: str) -> list[list[str]]:
    """The cells' texts of every row that ``rows`` (a CSS selector) selects."""
    found: list[list[str]] = browser.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0]), "
        "row => Array.from(row.cells, cell => cell.innerText.trim()));", rows)
    return found


def _click(browser: WebDriver, selector: str) -> None:
    for _attempt in range(5):
        try:
            browser.find_element(By.CSS_SELECTOR, selector).click()
            return
        except StaleElementReferenceException:
            continue
    raise AssertionError(f"{selector} kept being replaced under the click")


def _mark_page(browser: WebDriver) -> None:
    """Leave a mark in the page's JavaScript state: a reload would wipe it."""
    browser.execute_script("window.gcNotReloaded = true;")


def _not_reloaded(browser: WebDriver) -> bool:
    return browser.execute_script("return window.gcNotReloaded === true;") is True


def test_sign_in_refuses_a_wrong_token_then_admits_alice(browser: WebDriver,
                                                         stack: Stack) -> None:
    _sign_in(browser, stack, "gct_not-a-token")
    _wait_for(browser, "the refusal", lambda b: _text(b, "error"))
    refusal = _text(browser, "error")
    browser.save_screenshot(str(ARTIFACTS / "login.png"))

    _sign_in(browser, stack, stack.tokens["alice"])
    _wait_for(browser, "the tasks page", lambda b: b.current_url.endswith("/ui/tasks"))

    assert refusal.startswith("The registry refused this token")
    assert _text(browser, "viewer") == "alice"
    session = browser.get_cookie("gc_ui_session")
    assert session is not None and session["httpOnly"] and session["sameSite"] == "Strict"
    assert stack.tokens["alice"] not in session["value"]


def test_endpoints_show_alices_endpoint_online_with_its_workers(browser: WebDriver,
                                                                stack: Stack) -> None:
    browser.get(f"{stack.url}/ui/endpoints")
    _wait_for(browser, "the endpoint to be online",
              lambda b: "online" in _cells(b, "tr.endpoint")[0])
    row = " ".join(_cells(browser, "tr.endpoint")[0])
    browser.save_screenshot(str(ARTIFACTS / "endpoints.png"))

    assert "lab" in row and stack.endpoint.endpoint_id in row
    assert "/ 2" in row  # busy of 2 workers
    assert "ago" in row  # the last heartbeat


def test_functions_lists_what_alices_sweep_registered(browser: WebDriver, stack: Stack) -> None:
    browser.get(f"{stack.url}/ui/functions")
    names = {cells[0] for cells in _cells(browser, "tr.function")}
    browser.save_screenshot(str(ARTIFACTS / "functions.png"))

    assert {"sweep_step", "sleeps_long", "fails_loudly"} <= names


def test_tasks_page_by_page_and_filter_by_state_newest_first_while_the_sweep_runs(
        browser: WebDriver, stack: Stack) -> None:
    browser.get(f"{stack.url}/ui/tasks")
    first_page = _cells(browser, "tr.task")
    _click(browser, "a.next")
    _wait_for(browser, "the next page", lambda b: "cursor=" in b.current_url)
    second_page = _cells(browser, "tr.task")
    browser.get(f"{stack.url}/ui/tasks")
    Select(browser.find_element(By.NAME, "state")).select_by_value("waiting")
    browser.find_element(By.CSS_SELECTOR, "form.filters button").click()
    _wait_for(browser, "the filtered list", lambda b: "state=waiting" in b.current_url)
    waiting = _cells(browser, "tr.task")
    browser.save_screenshot(str(ARTIFACTS / "tasks.png"))

    every_task = [stack.long_task, stack.failed_task, *stack.sweep]
    shown = [cells[0] for cells in first_page + second_page]
    assert sorted(shown) == sorted(f.task_id for f in every_task)  # type: ignore[attr-defined]
    submitted = [cells[2] for cells in first_page + second_page]
    assert submitted == sorted(submitted, reverse=True)
    # the long task waits until it is cancelled, below: the sweep is still running
    assert waiting and {cells[1] for cells in waiting} == {"waiting"}


def test_a_failed_task_shows_its_history_output_and_remote_traceback(browser: WebDriver,
                                                                     stack: Stack) -> None:
    with pytest.raises(Exception, match="the sample was empty"):
        stack.failed_task.result(timeout=PATIENCE)
    task_id = stack.failed_task.task_id  # type: ignore[attr-defined]
    browser.get(f"{stack.url}/ui/tasks/{task_id}")
    _wait_for(browser, "the failure", lambda b: _text(b, "status") == "failed")
    browser.save_screenshot(str(ARTIFACTS / "task-failed.png"))

    assert "about to fail" in _text(browser, "stdout")
    traceback = _text(browser, "traceback")
    assert "ValueError: the sample was empty" in traceback and "fails_loudly" in traceback
    assert [cells[0] for cells in _cells(browser, "#history tbody tr")][-1] == "failed"
    assert not browser.find_elements(By.ID, "cancel")


def test_alice_cancels_a_running_task_and_its_page_turns_cancelled_without_reloading(
        browser: WebDriver, stack: Stack) -> None:
    task_id = stack.long_task.task_id  # type: ignore[attr-defined]
    browser.get(f"{stack.url}/ui/tasks/{task_id}")
    assert _text(browser, "status") == "waiting"
    _click(browser, "#cancel")
    _wait_for(browser, "the notice", lambda b: _text(b, "notice"))
    notice = _text(browser, "notice")
    _mark_page(browser)
    _wait_for(browser, "the task to turn cancelled", lambda b: _text(b, "status") == "cancelled")
    browser.save_screenshot(str(ARTIFACTS / "task-cancelled.png"))

    assert notice == "Cancel sent to the endpoint."
    assert _not_reloaded(browser)
    assert "was cancelled while running; its worker was stopped" in _text(browser, "history")
    recorded = RegistryClient(stack.url, token=stack.tokens["alice"]).get_tasks([task_id])[0]
    assert recorded.status == "cancelled"
    assert not browser.find_elements(By.ID, "cancel")


def test_the_group_page_follows_the_sweep_to_its_end_without_reloading(
        browser: WebDriver, stack: Stack) -> None:
    browser.get(f"{stack.url}/ui/groups/{stack.group}")
    _mark_page(browser)
    _wait_for(browser, "every task of the group to finish",
              lambda b: _text(b, "progress").startswith(f"{SWEEP + 2} of {SWEEP + 2} finished"))
    browser.save_screenshot(str(ARTIFACTS / "group.png"))

    assert [future.result(timeout=PATIENCE) for future in stack.sweep] == [
        seed * seed for seed in range(SWEEP)]
    assert f"{SWEEP} succeeded, 1 failed, 1 cancelled, 0 waiting" in _text(browser, "progress")
    assert _not_reloaded(browser)


def test_bob_signed_in_after_alice_sees_none_of_it(browser: WebDriver, stack: Stack) -> None:
    alices_task = stack.sweep[0].task_id  # type: ignore[attr-defined]
    alices_group = stack.group
    _sign_in(browser, stack, stack.tokens["bob"])
    _wait_for(browser, "bob's tasks page", lambda b: _text(b, "viewer") == "bob")
    tasks_page = _text(browser, "live")
    browser.save_screenshot(str(ARTIFACTS / "bob-tasks.png"))
    pages = {}
    for path in ("/ui/endpoints", "/ui/functions", f"/ui/tasks/{alices_task}",
                 f"/ui/groups/{alices_group}", f"/ui/tasks?group={alices_group}"):
        browser.get(stack.url + path)
        pages[path] = str(browser.execute_script(
            "return document.querySelector('main').innerText;"))

    assert "No tasks to show." in tasks_page
    assert "No endpoints you may see" in pages["/ui/endpoints"]
    assert "No functions you may run yet" in pages["/ui/functions"]
    assert "(or it is not yours)" in pages[f"/ui/tasks/{alices_task}"]
    assert "none of its tasks is yours" in pages[f"/ui/groups/{alices_group}"]
    assert "No tasks to show." in pages[f"/ui/tasks?group={alices_group}"]
    for text in pages.values():
        assert stack.endpoint.endpoint_id not in text and "sweep_step" not in text
        assert "step 0" not in text
