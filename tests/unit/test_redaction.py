"""What gc-agent diagnose masks: secrets known by value, and secrets known by their shape."""

from __future__ import annotations

from gc_agent.redaction import MASK, Redactor, is_secret_name, url_passwords


def test_a_known_secret_is_masked_as_written_and_url_encoded() -> None:
    redactor = Redactor(["p@ss/word+1"])

    text = redactor.text("login p@ss/word+1 via amqp://u:p%40ss%2Fword%2B1@host/")

    assert "p@ss/word+1" not in text and "p%40ss%2Fword%2B1" not in text
    assert text.startswith(f"login {MASK} via amqp://u:")


def test_secrets_of_known_shapes_are_masked_without_being_known() -> None:
    text = Redactor([]).text(
        "amqps://agent:hunter22@broker:5671/vhost token gct_AbC-123_xyz "
        "Authorization: Bearer abc.def password=letmein secret: s3cr3t")

    for secret in ("hunter22", "gct_AbC-123_xyz", "abc.def", "letmein", "s3cr3t"):
        assert secret not in text
    assert "amqps://agent:***@broker:5671/vhost" in text


def test_data_masks_secret_keys_whole_and_leaves_the_rest() -> None:
    data = Redactor(["tok-value"]).data({
        "GC_TOKEN": "anything", "token_file": "/x/agent.token", "empty_password": "",
        "nested": [{"db_password": "pw", "note": "has tok-value inside"}]})

    assert data == {"GC_TOKEN": MASK, "token_file": "/x/agent.token", "empty_password": "",
                    "nested": [{"db_password": MASK, "note": f"has {MASK} inside"}]}


def test_secret_names_and_url_passwords() -> None:
    assert is_secret_name("GC_REGISTRY_BROKER_AUTH_SECRET") and is_secret_name("GC_TOKEN")
    assert not is_secret_name("token_file") and not is_secret_name("GC_HOME")
    assert url_passwords("amqp://a:one@h1/v, amqp://a:two@h2/v,amqp://h3/v") == ["one", "two"]
