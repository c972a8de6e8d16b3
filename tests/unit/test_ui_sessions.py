"""The dashboard's parts below its pages: sessions (on a real SQLite database), where
sign-in may lead, listing cursors."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from gc_core.registry import identity, listing
from gc_core.registry.db import UiSessionRow, open_database
from gc_core.registry.ui import sessions
from gc_core.registry.ui.pages import _safe_next
from gc_core.registry.ui.sessions import same_secret


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Session]:
    """A fresh registry database (SQLite), with alice and a token of hers."""
    with open_database(f"sqlite:///{tmp_path / 'registry.db'}")() as session:
        identity.create_user(session, "alice")
        session.commit()
        yield session


def _token_id(db: Session) -> str:
    token_id = identity.issue_token(db, "alice").token_id
    db.commit()
    return token_id


def test_a_session_is_found_by_its_id_alone_and_gone_once_closed(db: Session) -> None:
    token_id = _token_id(db)
    session_id, session = sessions.open_session(db, token_id)

    assert sessions.find_session(db, session_id) == session
    assert session.token_id == token_id
    assert sessions.find_session(db, session_id + "x") is None
    assert sessions.find_session(db, "") is None
    sessions.close_session(db, session_id)
    assert sessions.find_session(db, session_id) is None


def test_the_database_keeps_neither_the_session_id_nor_a_token(db: Session) -> None:
    session_id, _ = sessions.open_session(db, _token_id(db))

    (key,) = db.scalars(select(UiSessionRow.key)).all()
    assert key != session_id and session_id not in key


def test_an_idle_session_expires(db: Session) -> None:
    session_id, _ = sessions.open_session(db, None)
    db.execute(update(UiSessionRow).values(
        last_used=UiSessionRow.last_used - sessions.SESSION_IDLE_SECONDS - 1))
    db.commit()

    assert sessions.find_session(db, session_id) is None
    assert db.scalars(select(UiSessionRow)).all() == []


def test_a_sessions_use_is_written_down_at_most_once_a_minute(db: Session) -> None:
    session_id, _ = sessions.open_session(db, None)

    def last_used() -> float:
        return db.scalars(select(UiSessionRow.last_used)).one()

    opened = last_used()
    sessions.find_session(db, session_id)
    assert last_used() == opened
    db.execute(update(UiSessionRow).values(last_used=opened - sessions.TOUCH_SECONDS - 1))
    db.commit()
    sessions.find_session(db, session_id)
    assert last_used() >= opened


def test_the_least_recently_used_session_makes_room(db: Session,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sessions, "MAX_SESSIONS", 2)
    oldest, _ = sessions.open_session(db, None)
    newer, _ = sessions.open_session(db, None)
    db.execute(update(UiSessionRow).where(UiSessionRow.key == sessions._key(oldest))
               .values(last_used=UiSessionRow.last_used - 10))
    db.commit()
    newest, _ = sessions.open_session(db, None)

    assert sessions.find_session(db, oldest) is None
    assert sessions.find_session(db, newer) is not None
    assert sessions.find_session(db, newest) is not None


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
