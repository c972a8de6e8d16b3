"""The dashboard's pure parts: sessions, where sign-in may lead, listing cursors."""

from __future__ import annotations

import pytest

from gc_core.registry import listing
from gc_core.registry.ui import sessions
from gc_core.registry.ui.pages import _safe_next
from gc_core.registry.ui.sessions import SessionStore, same_secret


def test_a_session_is_found_by_its_id_alone_and_gone_once_closed() -> None:
    store = SessionStore()
    session_id, session = store.open("gct_secret")

    assert store.find(session_id) is session
    assert store.find(session_id + "x") is None and store.find("") is None
    store.close(session_id)
    assert store.find(session_id) is None


def test_an_idle_session_expires() -> None:
    store = SessionStore()
    session_id, session = store.open(None)
    session.last_used -= sessions.SESSION_IDLE_SECONDS + 1

    assert store.find(session_id) is None


def test_the_least_recently_used_session_makes_room(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sessions, "MAX_SESSIONS", 2)
    store = SessionStore()
    oldest, first = store.open("a")
    newer, _ = store.open("b")
    first.last_used -= 10
    newest, _ = store.open("c")

    assert store.find(oldest) is None
    assert store.find(newer) is not None and store.find(newest) is not None


def test_csrf_secrets_must_match_exactly_and_be_present() -> None:
    assert same_secret("abc", "abc")
    assert not same_secret("abd", "abc") and not same_secret(None, "abc")
    assert not same_secret("", "")


@pytest.mark.parametrize(("target", "lands"), [
    ("/ui/tasks?state=waiting", "/ui/tasks?state=waiting"),
    ("/ui/groups/g1", "/ui/groups/g1"),
    ("https://evil.example/ui/", "/ui/tasks"),
    ("//evil.example/ui/", "/ui/tasks"),
    ("/ui/../admin", "/ui/tasks"),
    ("/ui/%2E%2E/admin", "/ui/tasks"),
    ("/ui/\\evil.example", "/ui/tasks"),
    ("/ui/\tx", "/ui/tasks"),
    ("/docs", "/ui/tasks"),
    (None, "/ui/tasks"),
])
def test_sign_in_leads_only_to_a_dashboard_page(target: str | None, lands: str) -> None:
    assert _safe_next(target) == lands


@pytest.mark.parametrize("cursor", [
    "", "***", "bm90IGpzb24=", "WzEsIDIsIDNd",  # not base64 JSON; [1, 2, 3]
    "WyJ4IiwgImlkIl0=",                         # ["x", "id"]: the key is not a number
    "WzFlOTk5LCAiaWQiXQ==",                      # [1e999, "id"]: not finite
    "WzEsICJpZFx1MDAwMCJd",                    # [1, "id\u0000"]: not an id
])
def test_a_cursor_the_registry_did_not_give_is_refused_saying_so(cursor: str) -> None:
    with pytest.raises(ValueError, match="is not one this registry gave"):
        listing._read_cursor(cursor)


def test_a_cursor_gives_back_what_it_holds() -> None:
    assert listing._read_cursor(listing._cursor(1765000000.123456, "task-1")) == (
        1765000000.123456, "task-1")
