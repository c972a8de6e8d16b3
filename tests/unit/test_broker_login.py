"""Broker credentials from a registry token: which URL gets them, and what a refusal says."""

from __future__ import annotations

from gc_core.broker_login import TokenLogin, redact_url, token_login


def test_a_token_logs_in_to_a_broker_url_without_credentials() -> None:
    login = token_login("amqp://broker.example:5673/fabric", "alice", "gct_s3cret/+")

    assert login is not None
    url = login.apply("amqp://broker.example:5673/fabric")
    assert url == "amqp://alice:gct_s3cret%2F%2B@broker.example:5673/fabric"
    assert "s3cret" not in redact_url(url)


def test_a_url_with_its_own_credentials_keeps_them_and_no_token_means_no_login() -> None:
    assert token_login("amqp://guest:guest@127.0.0.1:5672/%2F", "alice", "gct_x") is None
    assert token_login("amqp://127.0.0.1:5672/%2F", "alice", None) is None


def test_a_refused_login_says_whose_token_and_what_to_do_without_the_token() -> None:
    login = TokenLogin("endpoint-e1", "gct_s3cret", remedy="issue a new agent token")
    url = login.apply("amqp://127.0.0.1:5673/%2F")

    message = login.refusal(url, vhost_refused=False)

    assert "refused the token for endpoint-e1" in message and "issue a new agent token" in message
    assert "s3cret" not in message and "\n" not in message
    assert "s3cret" not in repr(login)
