"""The SDK-shaped front end's refusals and local pieces (the scripts in tests/compat run it
against a live fabric)."""

from __future__ import annotations

import pytest

from gc_client.globus_compute import (
    Client,
    Executor,
    MPIFunction,
    ShellFunction,
    release_line,
)
from gc_core.broker_login import broker_urls_on_port


def test_a_container_id_is_refused_naming_where_containers_are_chosen() -> None:
    with pytest.raises(ValueError, match="container_type, container_uri"):
        Executor("ep", container_id="00000000-0000-0000-0000-000000000000")


def test_an_argument_the_sdk_does_not_have_is_refused_by_name() -> None:
    with pytest.raises(TypeError, match="'max_workers' is not an argument of Executor"):
        Executor("ep", max_workers=4)


def test_a_serializer_object_is_refused_for_a_serializers_name() -> None:
    with pytest.raises(TypeError, match="serializer's name"):
        Executor("ep", serializer=object())  # type: ignore[arg-type]


@pytest.mark.parametrize("function", [ShellFunction, MPIFunction])
def test_output_files_are_refused_since_output_comes_back_on_the_result(
        function: type[ShellFunction]) -> None:
    with pytest.raises(ValueError, match=r"result\.stdout"):
        function("hostname", "/tmp/out.txt")


def test_a_shell_function_with_return_dict_answers_in_the_sdks_dict() -> None:
    result = ShellFunction("echo {word}; echo oops >&2", return_dict=True)(word="hi")
    assert result == {"cmd": "echo hi; echo oops >&2", "returncode": 0, "stdout": "hi\n",
                      "stderr": "oops\n"}


def test_an_empty_batch_is_refused() -> None:
    client = Client(do_version_check=False, registry_url="http://127.0.0.1:9")
    with pytest.raises(ValueError, match="no tasks in the batch"):
        client.batch_run("ep", client.create_batch())


def test_login_arguments_of_the_sdk_are_ignored_with_a_warning() -> None:
    with pytest.warns(UserWarning, match="app ignored: gc-fabric logs in with the token"):
        Client(do_version_check=False, app=object())


@pytest.mark.parametrize(("release", "line"), [("1.4.2", "1"), ("0.1.0", "0.1"), ("0.2", "0.2")])
def test_releases_interoperate_within_a_major_version_or_a_0_minor(release: str,
                                                                   line: str) -> None:
    assert release_line(release) == line


def test_amqp_port_moves_every_broker_of_a_cluster_and_keeps_the_rest() -> None:
    moved = broker_urls_on_port("amqps://alice:s3cret@node1:5671/prod?cafile=/ca.pem,"
                                "amqps://alice:s3cret@node2/prod?cafile=/ca.pem", 443)
    assert moved == ("amqps://alice:s3cret@node1:443/prod?cafile=/ca.pem,"
                     "amqps://alice:s3cret@node2:443/prod?cafile=/ca.pem")
