"""The dashboard's defences, over HTTP against a real tokens-mode registry: sessions that
hold no token and end with it, CSRF on every form, no open redirect, escaped content, and
nothing of another user's. test_ui_browser.py walks the pages in a real browser.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import pytest
from sqlalchemy.orm import Session

from gc_core.protocol import GroupManifest
from gc_core.registry import identity, store
from gc_core.registry.db import open_database
from gc_core.registry_api.schemas import EndpointIn, FunctionIn
from tests.fabric import Fabric
from tests.integration.conftest import OwnRegistry


@dataclass
class Site:
    """A tokens-mode registry with alice's waiting task and bob, who has nothing."""

    url: str
    db: Session
    tokens: dict[str, str]
    task_id: str
    endpoint_id: str
    db_url: str

    def browser(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, follow_redirects=False, timeout=30)

    @contextmanager
    def signed_in(self, user: str) -> Iterator[tuple[httpx.Client, str]]:
        """A client with a session of ``user``'s, and the session's CSRF secret."""
        with self.browser() as client:
            answer = _sign_in(client, self.tokens[user])
            assert answer.status_code == 303, answer.text
            yield client, _csrf(client.get("/ui/tasks").text)


def _csrf(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found is not None, html
    return found.group(1)


def _sign_in(client: httpx.Client, token: str, next_page: str = "/ui/tasks") -> httpx.Response:
    form = client.get("/ui/login")
    return client.post("/ui/login", data={"csrf": _csrf(form.text), "token": token,
                                          "next": next_page})


@pytest.fixture(scope="module")
def site(own_registry: OwnRegistry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    db_url = f"sqlite:///{tmp_path_factory.mktemp('ui') / 'registry.db'}"
    server, _ = own_registry(db_url, "tokens")
    with open_database(db_url)() as db:
        for name in ("alice", "bob"):
            identity.create_user(db, name)
        tokens = {name: identity.issue_token(db, name).token for name in ("alice", "bob")}
        endpoint = store.create_endpoint(db, EndpointIn(name="lab"), owner="alice").endpoint_id
        tokens["agent"] = identity.issue_token(db, "alice", endpoint_id=endpoint).token
        store.record_manifest(db, GroupManifest(task_group_id="sweep", endpoint_id=endpoint,
                                                user="alice", task_ids=["alices-task"],
                                                submitted=1.0))
        db.commit()
        yield Site(server.url, db, tokens, "alices-task", endpoint, db_url)


def test_a_page_without_a_session_sends_the_browser_to_sign_in_and_back(site: Site) -> None:
    with site.browser() as client:
        asked = client.get("/ui/tasks", params={"state": "waiting"})
        signed_in = _sign_in(client, site.tokens["alice"], next_page="/ui/tasks?state=waiting")

    assert asked.status_code == 303
    assert asked.headers["location"] == "/ui/login?next=%2Fui%2Ftasks%3Fstate%3Dwaiting"
    assert signed_in.headers["location"] == "/ui/tasks?state=waiting"


def test_the_session_cookie_is_httponly_strict_and_holds_no_token(site: Site) -> None:
    with site.browser() as client:
        answer = _sign_in(client, site.tokens["alice"])
        page = client.get("/ui/endpoints")

    cookie = next(value for value in answer.headers.get_list("set-cookie")
                  if value.startswith("gc_ui_session="))
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/ui" in cookie
    assert site.tokens["alice"] not in cookie
    assert page.status_code == 200
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["cache-control"] == "no-store"


def test_sign_in_without_the_forms_csrf_secret_is_refused(site: Site) -> None:
    with site.browser() as client:
        client.get("/ui/login")
        forged = client.post("/ui/login", data={"csrf": "guessed", "token": site.tokens["alice"]})

    assert forged.status_code == 401 and "gc_ui_session" not in forged.headers.get("set-cookie", "")
    assert "This sign-in form is stale" in forged.text


def test_after_sign_in_only_dashboard_pages_are_gone_to_never_another_site(site: Site) -> None:
    with site.browser() as client:
        answers = [_sign_in(client, site.tokens["alice"], next_page=target)
                   for target in ("https://evil.example/", "//evil.example/ui/", "/ui/../x",
                                  "/ui/%2e%2e/x", "/ui/\\evil.example", "/ui/groups/g")]

    assert [answer.headers["location"] for answer in answers] == [
        "/ui/tasks", "/ui/tasks", "/ui/tasks", "/ui/tasks", "/ui/tasks", "/ui/groups/g"]


def test_a_cancel_without_the_sessions_csrf_secret_is_refused(site: Site) -> None:
    with site.signed_in("alice") as (client, _csrf_secret):
        forged = client.post(f"/ui/tasks/{site.task_id}/cancel", data={"csrf": "guessed"})
        bare = client.post(f"/ui/tasks/{site.task_id}/cancel")

    assert forged.status_code == bare.status_code == 403
    # a page of the dashboard that says what to do, not the API's JSON
    for refused in (forged, bare):
        assert refused.headers["content-type"].startswith("text/html")
        assert "This form is stale or came from another site" in refused.text
        assert 'action="/ui/logout"' in refused.text  # the dashboard's own page, signed in


def test_bob_can_neither_see_nor_cancel_alices_task(site: Site) -> None:
    with site.signed_in("bob") as (client, csrf):
        page = client.get(f"/ui/tasks/{site.task_id}")
        cancelled = client.post(f"/ui/tasks/{site.task_id}/cancel", data={"csrf": csrf})
        group = client.get("/ui/groups/sweep")
        listed = client.get("/ui/tasks")

    assert page.status_code == cancelled.status_code == group.status_code == 404
    assert "(or it is not yours)" in cancelled.text
    assert site.task_id not in listed.text and site.endpoint_id not in listed.text
    assert ">lab<" not in listed.text


def test_an_agent_token_cannot_sign_in(site: Site) -> None:
    with site.browser() as client:
        answer = _sign_in(client, site.tokens["agent"])

    assert answer.status_code == 401 and "an endpoint&#39;s agent token" in answer.text


def test_revoking_the_token_ends_its_sessions_and_signing_out_ends_one(site: Site) -> None:
    token = identity.issue_token(site.db, "alice", label="revoked soon")
    site.db.commit()
    holder = Site(site.url, site.db, {"alice": token.token}, site.task_id, site.endpoint_id,
                  site.db_url)
    with holder.signed_in("alice") as (revoked, _), site.signed_in("alice") as (leaving, csrf):
        identity.revoke_token(site.db, token.token_id, by=identity.ANONYMOUS)
        after_revoke = revoked.get("/ui/tasks")
        signed_out = leaving.post("/ui/logout", data={"csrf": csrf})
        leaving.cookies.set("gc_ui_session", signed_out.request.headers["cookie"]
                            .split("gc_ui_session=")[1].split(";")[0], path="/ui")
        after_sign_out = leaving.get("/ui/tasks")

    assert after_revoke.status_code == 303 and after_revoke.headers["location"].startswith("/ui/login")
    assert signed_out.status_code == 303
    assert after_sign_out.status_code == 303


def test_a_session_holds_on_every_registry_of_its_database(
        site: Site, own_registry: OwnRegistry) -> None:
    # Several registries behind one address: the next request may reach any of them.
    other, _ = own_registry(site.db_url, "tokens")
    with site.signed_in("alice") as (client, csrf):
        session = client.cookies["gc_ui_session"]
        client.base_url = httpx.URL(other.url)
        page = client.get("/ui/tasks")
        signed_out = client.post("/ui/logout", data={"csrf": csrf})
        client.base_url = httpx.URL(site.url)
        client.cookies.set("gc_ui_session", session, path="/ui")  # a copy kept elsewhere
        after = client.get("/ui/tasks")

    assert page.status_code == 200 and site.task_id in page.text
    assert signed_out.status_code == 303 and signed_out.headers["location"] == "/ui/login"
    assert after.status_code == 303 and after.headers["location"].startswith("/ui/login")


def test_what_users_named_is_escaped_not_run(site: Site) -> None:
    name = "<script>alert('owned')</script>"
    store.register_function(site.db, FunctionIn(
        name=name, content_type="application/vnd.gc.cloudpickle",
        payload_b64=base64.b64encode(b"x").decode(), python_version="3.11.7",
        serializer="cloudpickle"), owner="alice")
    with site.signed_in("alice") as (client, _):
        page = client.get("/ui/functions").text

    assert name not in page
    assert "&lt;script&gt;alert(&#39;owned&#39;)&lt;/script&gt;" in page


def test_an_open_registry_signs_in_without_a_token_and_a_tokens_one_does_not(
        site: Site, fabric: Fabric) -> None:
    # fabric: the session's registry, open as the demo's is
    with httpx.Client(base_url=fabric.registry_url, follow_redirects=False, timeout=30) as client:
        signed_in = _sign_in(client, "")
        page = client.get("/ui/endpoints")
    with site.browser() as client:
        refused = _sign_in(client, "")

    assert signed_in.status_code == 303 and page.status_code == 200
    assert '<span id="viewer">anonymous</span>' in page.text
    assert refused.status_code == 401 and "Paste your token" in refused.text
