"""Broker credentials from a registry token: which URL gets them, and what a refusal says;
several URLs for the nodes of a cluster."""

from __future__ import annotations

import pytest

from gc_core.broker_login import TokenLogin, broker_urls, redact_url, token_login
from gc_core.errors import ConfigError


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


def test_several_broker_urls_are_the_nodes_of_one_cluster_in_the_order_given() -> None:
    nodes = broker_urls(" amqp://u:p@n1:5672/fab, amqp://u:p@n2:5672/fab ,amqp://u:p@n3/fab")

    assert nodes == ["amqp://u:p@n1:5672/fab", "amqp://u:p@n2:5672/fab", "amqp://u:p@n3/fab"]
    assert redact_url(",".join(nodes)).split(",") == [
        "amqp://u:***@n1:5672/fab", "amqp://u:***@n2:5672/fab", "amqp://u:***@n3/fab"]


def test_no_vhost_and_the_root_vhost_are_the_same_for_a_cluster() -> None:
    assert len(broker_urls("amqp://u@n1, amqp://u@n2/, amqp://u@n3/%2F")) == 3


@pytest.mark.parametrize("value", ["amqp://u:p@n1/a,amqp://u:p@n2/b", "amqp://u:p@n1/a,amqp://v:p@n2/a"],
                         ids=["two-vhosts", "two-users"])
def test_nodes_of_one_cluster_share_their_login_and_vhost(value: str) -> None:
    with pytest.raises(ConfigError, match="different users or virtual hosts") as refused:
        broker_urls(value)
    assert ":p@" not in str(refused.value)


@pytest.mark.parametrize("value", ["", " , "])
def test_no_broker_url_is_named_with_the_form_to_write(value: str) -> None:
    with pytest.raises(ConfigError, match=r"amqp://user:password@host:5672/vhost"):
        broker_urls(value)
