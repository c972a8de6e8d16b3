"""The messages between root's agent and a user's engine process: typed, one JSON line each.

A message that does not decode is a ``ProtocolError`` naming the problem; neither side's loop
stops for one.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from pathlib import Path

import cloudpickle
import pytest

from gc_agent.config import HtexEngineConfig
from gc_agent.engines.processes import WorkerLaunch
from gc_agent.engines.threads import ThreadEngine
from gc_agent.execution import Job, Outcome
from gc_agent.multiuser.remote import RemoteEngine
from gc_agent.multiuser.user_engine import handle_requests
from gc_agent.wire import (
    CancelledReport,
    CancelRequest,
    OutcomeReport,
    RefusedReport,
    Report,
    ShutdownRequest,
    StartFailedReport,
    StartRequest,
    StatusReport,
    SubmitRequest,
    TakenReport,
    TakeWaitingRequest,
    decode_report,
    decode_request,
    encode_message,
)
from gc_core.errors import ProtocolError
from gc_core.protocol import ErrorInfo
from gc_core.serialize import CLOUDPICKLE, PYTHON_VERSION

JOB = Job("t1", "f", b"\x80code", "3.11.2", "application/json", b"{}", "3.11.2", "cp 3",
          resource_spec={"priority": 1}, identity="alice@uni.edu", user_options={"max_blocks": 1})
OUTCOME = Outcome("t1", "failed", payload=b"\x00\xfb\xff", error=ErrorInfo(type="E", message="m"),
                  started=1.0, worker="n1:2 block 0 slurm job 7")
#: A well-formed outcome as it appears inside a line, for lines that break one field of it.
GOOD_OUTCOME = encode_message(OutcomeReport(outcome=OUTCOME)).decode().strip()


def test_every_message_crosses_as_one_json_line_and_comes_back_equal() -> None:
    requests = [StartRequest(name="alice-1a2b", config=HtexEngineConfig(type="htex")),
                SubmitRequest(job=JOB), CancelRequest(task_id="t1"), TakeWaitingRequest(),
                ShutdownRequest()]
    reports = [OutcomeReport(outcome=OUTCOME), CancelledReport(task_id="t1", result="removed"),
               TakenReport(task_ids=["t1", "t2"]), StatusReport(status={"blocks_running": 1}),
               StartFailedReport(reason="ValueError: no"), RefusedReport(problem="no op")]

    for request in requests:
        line = encode_message(request)
        assert line.endswith(b"\n") and line.count(b"\n") == 1
        assert decode_request(line) == request
    for report in reports:
        assert decode_report(encode_message(report)) == report


@pytest.mark.parametrize(("line", "problem"), [
    (b'{"op": "frobnicate"}', "unknown op 'frobnicate'; expected one of 'outcome', 'cancelled', "),
    (b'{"op": "submit", "job": {}}', "unknown op 'submit'"),  # a request is not a report
    (b'{"task_id": "t1"}', "no op: every message names its op"),
    (b'["outcome"]', "Input should be an object"),
    (b'{"op": "outcome"}', "malformed outcome message: outcome: Field required"),
    (b'{"op": "cancelled", "task_id": 7, "result": "removed"}',
     "malformed cancelled message: task_id: Input should be a valid string"),
    (b'{"op": "cancelled", "task_id": "t1", "result": "vanished"}',
     "malformed cancelled message: result: Input should be 'removed', 'interrupted'"),
    (b'{"op": "status", "status": "all fine"}',
     "malformed status message: status: Input should be an object"),
    (b'{"op": "taken", "task_ids": "t1"}', "malformed taken message: task_ids: Input should be"),
    (GOOD_OUTCOME.replace('"state":"failed"', '"state":"pwned"').encode(),
     "malformed outcome message: outcome.state: Input should be 'success', 'failed'"),
    (GOOD_OUTCOME.replace('"payload":"', '"payload":"%').encode(),
     "malformed outcome message: outcome.payload: Data should be valid base64"),
    (GOOD_OUTCOME.replace('"worker":', '"shell":"rm -rf","worker":').encode(),
     "malformed outcome message: outcome.shell: Unexpected keyword argument"),
    (b'{"op": "status", "status": {}, "extra": 1}', "malformed status message: extra: Extra inputs"),
    (b"not json", "Invalid JSON"),
    (b"[" * 5000, "Invalid JSON: recursion limit exceeded"),
])
def test_a_report_root_cannot_decode_is_a_protocol_error_naming_the_problem(
        line: bytes, problem: str) -> None:
    with pytest.raises(ProtocolError, match=re.escape(problem)) as caught:
        decode_report(line)
    assert caught.value.raw == line


@pytest.mark.parametrize(("line", "problem"), [
    (b'{"op": "outcome", "outcome": {}}', "unknown op 'outcome'; expected one of 'start', 'submit', "),
    (b'{"op": "cancel"}', "malformed cancel message: task_id: Field required"),
    (b'{"op": "cancel", "task_id": ["t1"]}', "malformed cancel message: task_id: Input should be"),
    (b'{"op": "submit", "job": {"task_id": "t1"}}',
     "malformed submit message: job.function_id: Field required (and 6 more problems)"),
    (b'{"op": "start", "name": "a", "config": {"type": "processes"}}',
     "malformed start message: config.type: Input should be 'htex'"),
])
def test_a_request_a_user_engine_cannot_decode_is_a_protocol_error_naming_the_problem(
        line: bytes, problem: str) -> None:
    with pytest.raises(ProtocolError, match=re.escape(problem)):
        decode_request(line)


def test_an_unknown_op_is_named_safely_however_strange() -> None:
    with pytest.raises(ProtocolError) as caught:
        decode_report(b'{"op": "x\\n' + b"y" * 1000 + b'"}')
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 400


def test_a_user_engine_refuses_a_malformed_request_and_serves_the_next_one() -> None:
    # Given a real engine and, from root, three malformed requests among good ones
    engine = ThreadEngine(1)
    engine.start()
    sent: list[Report] = []
    outcome_sent = threading.Event()

    def send(report: Report) -> None:
        sent.append(report)
        if isinstance(report, OutcomeReport):
            outcome_sent.set()

    job = Job("t1", "fn-1", cloudpickle.dumps(pow), PYTHON_VERSION, CLOUDPICKLE.content_type,
              CLOUDPICKLE.dumps(((2, 5), {})), PYTHON_VERSION, CLOUDPICKLE.label)
    lines = [b'{"op": "frobnicate"}\n', b'{"op": "cancel"}\n', b'{"op": "cancel", "task_id": 7}\n',
             encode_message(CancelRequest(task_id="t9")), encode_message(TakeWaitingRequest()),
             encode_message(SubmitRequest(job=job)), encode_message(ShutdownRequest()),
             encode_message(CancelRequest(task_id="after shutdown"))]
    try:
        # When the engine's loop reads them
        handle_requests(engine, lines, send)
        assert outcome_sent.wait(30), sent
    finally:
        engine.shutdown()

    # Then each malformed one is refused with its problem, and the rest are served until shutdown
    refusals = [report.problem for report in sent if isinstance(report, RefusedReport)]
    assert [problem.split(";")[0] for problem in refusals] == [
        "unknown op 'frobnicate'", "malformed cancel message: task_id: Field required",
        "malformed cancel message: task_id: Input should be a valid string"]
    assert CancelledReport(task_id="t9", result="unknown") in sent
    assert TakenReport(task_ids=[]) in sent
    outcome = next(report.outcome for report in sent if isinstance(report, OutcomeReport))
    assert outcome.state == "success" and CLOUDPICKLE.loads(outcome.payload) == 32
    assert not any(isinstance(report, CancelledReport) and report.task_id == "after shutdown"
                   for report in sent)


@pytest.mark.parametrize(("first", "problem"), [
    (b'{"op": "start", "config": {"type": "htex"}}\n', "malformed start message: name: Field required"),
    (b'{"op": "take_waiting"}\n', "the first message must be start, not take_waiting"),
])
def test_a_user_engine_whose_first_message_is_not_a_good_start_tells_root_why(
        first: bytes, problem: str) -> None:
    process, ours = WorkerLaunch().spawn("gc_agent.multiuser.user_engine")
    with ours, ours.makefile("rwb") as channel:
        channel.write(first)
        channel.flush()
        answer = channel.readline()
    assert process.wait(60) == 0
    report = decode_report(answer)
    assert isinstance(report, StartFailedReport) and problem in report.reason


#: Stands in for a user's engine process: answers each op with the lines REPLIES gives it.
STAND_IN = """\
import json, os, sys
REPLIES = {replies!r}
channel = os.fdopen(int(sys.argv[3]), "r+b", buffering=0)
for line in channel:
    op = json.loads(line)["op"]
    channel.write(b"".join(REPLIES.get(op, [])))
    if op in ("shutdown", {exit_after!r}):
        break
"""


def _stand_in(tmp_path: Path, replies: dict[str, list[bytes]], exit_after: str = "") -> RemoteEngine:
    """Root's handle on a stand-in user engine (a real process) that replies as told."""
    fake = tmp_path / "python"
    fake.write_text(f"#!{sys.executable}\n" + STAND_IN.format(replies=replies, exit_after=exit_after))
    fake.chmod(0o755)
    return RemoteEngine(HtexEngineConfig(type="htex"), WorkerLaunch(python=str(fake)), name="stand-in")


def _run(engine: RemoteEngine, job: Job) -> Outcome:
    """Start ``engine``, hand it ``job`` and stop it once the job has its outcome."""
    done = threading.Event()
    outcomes: list[Outcome] = []
    engine.start()
    try:
        engine.submit(job, lambda outcome: (outcomes.append(outcome), done.set()))
        assert done.wait(30)
    finally:
        engine.shutdown()
    return outcomes[0]


def test_root_names_each_malformed_message_of_a_user_engine_and_keeps_reading(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Given a user engine that answers a task with four malformed messages, a refusal of one
    # of root's, then the task's outcome
    bad = [b'{"op": "frobnicate"}\n', b'{"op": "outcome"}\n',
           b'{"op": "status", "status": "all fine"}\n',
           b'{"op": "cancelled", "task_id": 7, "result": "removed"}\n']
    refusal = encode_message(RefusedReport(problem="malformed cancel message: task_id: Field required"))
    engine = _stand_in(tmp_path, {"submit": [*bad, refusal, encode_message(OutcomeReport(outcome=OUTCOME))]})
    caplog.set_level(logging.WARNING, logger="gc_agent.multiuser.remote")

    # When root hands it the task
    outcome = _run(engine, JOB)

    # Then the task gets its outcome, and root's log names each message's problem
    assert outcome == OUTCOME
    logged = [record.getMessage() for record in caplog.records
              if record.name == "gc_agent.multiuser.remote"]
    for problem in ("unknown op 'frobnicate'", "outcome message: outcome: Field required",
                    "status message: status: Input should be an object",
                    "cancelled message: task_id: Input should be a valid string",
                    "refused a message from this agent: malformed cancel message"):
        assert any(problem in line for line in logged), (problem, logged)


def test_the_tasks_of_a_user_engine_that_cannot_start_fail_with_its_reason(tmp_path: Path) -> None:
    failed = encode_message(StartFailedReport(reason="ConfigError: no sbatch on this host"))
    engine = _stand_in(tmp_path, {"submit": [failed]}, exit_after="submit")

    outcome = _run(engine, JOB)

    assert outcome.state == "failed" and outcome.error is not None
    assert outcome.error.type == "EngineStartFailed"
    assert "could not start: ConfigError: no sbatch on this host" in outcome.error.message
