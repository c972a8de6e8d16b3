"""gc_core.cli: one way from an error to a line and an exit status, tables, and polling."""

from __future__ import annotations

import time

import click
import pytest
from click.testing import CliRunner
from pydantic import BaseModel, ValidationError

from gc_core.cli import (
    EXIT_BROKEN_PIPE,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_TASK_FAILED,
    EXIT_TASK_PENDING,
    EXIT_USAGE,
    CommandLine,
    format_table,
    poll,
    report,
)
from gc_core.errors import (
    BrokerUnreachable,
    ConfigError,
    GCError,
    PolicyError,
    RegistryError,
    TaskExecutionFailed,
    TaskNotFound,
    TaskPending,
)
from gc_core.protocol import ErrorInfo


class _Lifetime(BaseModel):
    seconds: int


def _validation_error() -> ValidationError:
    try:
        _Lifetime.model_validate({"seconds": "soon"})
    except ValidationError as exc:
        return exc
    raise AssertionError("the model took a bad value")


# -- report: which status, which line -----------------------------------------------------


@pytest.mark.parametrize(("error", "status"), [
    (RegistryError("cannot reach the registry at http://r"), EXIT_ERROR),
    (BrokerUnreachable("amqp://b", "refused"), EXIT_ERROR),
    (ConfigError("bad config.yaml"), EXIT_ERROR),
    (PolicyError("not allowed"), EXIT_ERROR),
    (TaskNotFound("t1"), EXIT_TASK_FAILED),
    (TaskExecutionFailed(task_id="t1", remote_type="KeyError", remote_message="'x'",
                         remote_traceback="Traceback ..."), EXIT_TASK_FAILED),
    (TaskPending("t1", "waiting"), EXIT_TASK_PENDING),
], ids=lambda value: type(value).__name__ if isinstance(value, Exception) else str(value))
def test_each_error_of_ours_is_an_error_line_and_its_status(error: GCError, status: int) -> None:
    assert report(error) == (status, f"Error: {error}")


def test_an_error_a_tasks_endpoint_reported_is_the_tasks_whatever_its_class() -> None:
    refused = PolicyError.from_remote("t1", ErrorInfo(type="PolicyError", message="no json",
                                                      traceback=""))

    assert report(refused) == (EXIT_TASK_FAILED, f"Error: {refused}")


def test_a_value_a_schema_refuses_is_a_usage_error_naming_the_field() -> None:
    status, line = report(_validation_error()) or (0, "")

    assert status == EXIT_USAGE
    assert line.startswith("Error: seconds: ") and "\n" not in line


def test_ctrl_c_and_a_broken_pipe_have_the_shells_statuses() -> None:
    assert report(KeyboardInterrupt()) == (EXIT_INTERRUPTED, "Interrupted.")
    assert report(BrokenPipeError()) == (EXIT_BROKEN_PIPE, "")


def test_an_error_no_command_expects_is_left_to_show_its_traceback() -> None:
    assert report(ZeroDivisionError("a bug")) is None


# -- CommandLine: every command, and the group itself, end the same way -------------------


def _program(group_fails: bool = False) -> click.Group:
    @click.group(cls=CommandLine)
    def program() -> None:
        if group_fails:
            raise ConfigError("cannot read the stored login")

    failures: dict[str, BaseException] = {
        "registry": RegistryError("cannot reach the registry"),
        "pending": TaskPending("t1", "waiting"),
        "interrupted": KeyboardInterrupt(),
        "bug": ZeroDivisionError("a bug"),
    }
    for name, error in failures.items():
        def fail(error: BaseException = error) -> None:
            raise error
        program.command(name)(fail)

    @program.command()
    def refuse() -> None:
        raise click.ClickException("endpoint x is not running")

    return program


@pytest.mark.parametrize(("verb", "status", "stderr"), [
    ("registry", EXIT_ERROR, "Error: cannot reach the registry\n"),
    ("pending", EXIT_TASK_PENDING, "Error: task t1 is not finished (status: waiting)\n"),
    ("interrupted", EXIT_INTERRUPTED, "Interrupted.\n"),
    ("refuse", 1, "Error: endpoint x is not running\n"),  # click's own, in the same shape
])
def test_a_command_ends_with_one_line_and_its_status(verb: str, status: int, stderr: str) -> None:
    done = CliRunner().invoke(_program(), [verb])

    assert (done.exit_code, done.stdout, done.stderr) == (status, "", stderr)


def test_an_error_in_the_groups_own_callback_ends_the_same_way() -> None:
    done = CliRunner().invoke(_program(group_fails=True), ["registry"])

    assert (done.exit_code, done.stderr) == (EXIT_ERROR, "Error: cannot read the stored login\n")


def test_a_negative_number_taken_for_an_option_is_told_to_go_after_a_double_dash() -> None:
    program = _program()

    @program.command()
    @click.argument("args", nargs=-1)
    def run(args: tuple[str, ...]) -> None:
        click.echo(" ".join(args))

    done = CliRunner().invoke(program, ["run", "3", "-5"])

    assert done.exit_code == EXIT_USAGE
    assert "No such option '-5'" in done.stderr and "after --" in done.stderr
    assert "program run [OPTIONS] -- ARGS" in done.stderr
    assert CliRunner().invoke(program, ["run", "--", "3", "-5"]).stdout == "3 -5\n"
    assert "after --" not in CliRunner().invoke(program, ["run", "--nope"]).stderr


def test_a_bug_keeps_its_traceback() -> None:
    done = CliRunner().invoke(_program(), ["bug"])

    assert isinstance(done.exception, ZeroDivisionError)


# -- format_table -------------------------------------------------------------------------


def test_a_table_aligns_text_left_and_numbers_right_and_shows_none_as_a_dash() -> None:
    table = format_table(["ID", "STATUS", "QUEUED", "SECONDS", "NAME"],
                         [["a1", "online", 12, 0.5, "laptop"],
                          ["b22", "offline", None, None, None]])

    assert table.splitlines() == [
        "ID   STATUS   QUEUED  SECONDS  NAME",
        "a1   online       12    0.500  laptop",
        "b22  offline       -        -  -",
    ]


def test_a_table_row_splits_on_whitespace_into_its_cells() -> None:
    # Scripts (and the tests) read rows with str.split().
    row = ["3f2c", "online", 0, 2, 5, 1, 0]

    table = format_table(["ID", "STATUS", "QUEUED", "RUNNING", "DONE", "FAILED", "CANCELLED"],
                         [row])

    assert table.splitlines()[1].split() == [str(cell) for cell in row]


# -- poll ---------------------------------------------------------------------------------


def test_poll_returns_the_first_truthy_value() -> None:
    answers = iter([None, 0, "", "done", "later"])

    assert poll(lambda: next(answers), timeout=10) == "done"


def test_poll_returns_the_last_falsy_value_once_the_time_is_up() -> None:
    started = time.monotonic()

    assert poll(list, timeout=0.3, longest=0.05) == []
    assert 0.3 <= time.monotonic() - started < 2


def test_an_error_ends_a_poll_at_once() -> None:
    calls: list[int] = []

    def check() -> bool:
        calls.append(1)
        raise RegistryError("cannot reach the registry")

    with pytest.raises(RegistryError):
        poll(check, timeout=10)
    assert len(calls) == 1
