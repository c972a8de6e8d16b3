"""The registry's HTTP request and response bodies, shared by the service and its client."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from gc_core.protocol import ErrorInfo, Timings

__all__ = [
    "MAX_DESCRIPTION_LENGTH",
    "MAX_FUNCTION_B64_LENGTH",
    "MAX_FUNCTION_BYTES",
    "MAX_ID_LENGTH",
    "MAX_LABEL_LENGTH",
    "MAX_NAME_LENGTH",
    "MAX_SOURCE_LENGTH",
    "MAX_TYPE_LENGTH",
    "MAX_VERSION_LENGTH",
    "NAME_PATTERN",
    "EndpointIn",
    "EndpointOut",
    "EndpointPolicy",
    "EndpointStatus",
    "FunctionIn",
    "FunctionOut",
    "FunctionSharing",
    "IssuedToken",
    "TaskBatchIn",
    "TaskCheckIn",
    "TaskCheckOut",
    "TaskEvent",
    "TaskOut",
    "TaskStatus",
    "TokenIn",
    "TokenOut",
    "UserOut",
    "WhoAmI",
]

TaskStatus = Literal["waiting", "success", "failed", "cancelled", "unknown"]

# -- bounds: every free-text field of a request is capped, so no body can fill the database
# (or a terminal that lists it) with whatever it likes; a longer value is a 422 naming the field.

#: User and group names: one routing-key word (result queues are ``gc.results.<user>.<group>``).
#: Check it with ``re.fullmatch``: ``re.match`` lets ``$`` match before a trailing newline.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,63}$"
#: Longest id of an endpoint, function or task (a UUID is 36 characters).
MAX_ID_LENGTH = 64
#: Longest display name of a function or an endpoint, in characters.
MAX_NAME_LENGTH = 200
#: Longest description of an endpoint.
MAX_DESCRIPTION_LENGTH = 4096
#: Longest label of a token or a request id.
MAX_LABEL_LENGTH = 200
#: Longest content type or serializer label.
MAX_TYPE_LENGTH = 100
#: Longest Python version string (``3.11.7``).
MAX_VERSION_LENGTH = 40
#: Longest function source kept, in characters (1 MiB).
MAX_SOURCE_LENGTH = 2**20
#: Largest serialized function, in bytes.
MAX_FUNCTION_BYTES = 16 * 2**20
#: Longest serialized function, as base64.
MAX_FUNCTION_B64_LENGTH = 4 * (MAX_FUNCTION_BYTES // 3 + 1)

#: Text shown on one line: no control characters (a newline or an escape sequence in a name
#: would forge lines, or rewrite the screen, wherever it is listed).
_ONE_LINE = r"^[^\x00-\x1f\x7f]*$"

UserName = Annotated[str, StringConstraints(max_length=64, pattern=NAME_PATTERN)]
Id = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_LENGTH,
                                      pattern=r"^[A-Za-z0-9_\-]+$")]
Name = Annotated[str, StringConstraints(min_length=1, max_length=MAX_NAME_LENGTH,
                                        pattern=_ONE_LINE)]
Label = Annotated[str, StringConstraints(max_length=MAX_LABEL_LENGTH, pattern=_ONE_LINE)]
TypeName = Annotated[str, StringConstraints(max_length=MAX_TYPE_LENGTH, pattern=_ONE_LINE)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


#: The ids the OpenAPI examples below use (those of docs/asyncapi.yaml's examples).
_EXAMPLE_TASK_IDS = {
    "task_id": "5f0c2d1e-8a4b-4c3d-9e2f-1a2b3c4d5e6f",
    "task_group_id": "1b9d6bcd-bbfd-4b2d-9b5d-ab8dfbbd4bed",
    "endpoint_id": "0f4e2c58-52d4-4b8b-8f3e-9c6a1d2e7b44",
    "function_id": "7d6a1c1e-3f0b-4c52-9a3e-5d1f0c2b8a11",
    "user": "gateway",
}


class FunctionSharing(_Body):
    """Who may run a function besides its owner."""

    sharing: Literal["private", "groups", "public"] = "private"
    shared_groups: list[UserName] = Field(default_factory=list, max_length=1000)


class FunctionIn(_Body):
    """A function to register: its serialized form and, where available, its source."""

    name: Name
    content_type: TypeName
    payload_b64: str = Field(min_length=1, max_length=MAX_FUNCTION_B64_LENGTH)
    source: str | None = Field(default=None, max_length=MAX_SOURCE_LENGTH)
    python_version: str = Field(max_length=MAX_VERSION_LENGTH, pattern=_ONE_LINE)
    serializer: TypeName
    owner: UserName = Field(default="anonymous", description="Ignored when the registry "
                                                             "checks tokens: the caller owns it.")
    sharing: FunctionSharing = FunctionSharing()


class FunctionOut(_Body):
    """A registered function. Every one takes JSON calls (a task whose ``content_type`` is
    ``application/json``): how it was registered does not matter."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "function_id": _EXAMPLE_TASK_IDS["function_id"], "name": "weighted_sum",
        "content_hash": "sha256:9b1c…", "content_type": "application/vnd.gc.cloudpickle",
        "payload_b64": "gASV…", "source": "def weighted_sum(values, weight=1.0): ...",
        "python_version": "3.11.7", "serializer": "cloudpickle 3.0.0", "owner": "alice",
        "created": 1735689000.0, "sharing": {"sharing": "public", "shared_groups": []}}]})

    function_id: str
    name: str
    content_hash: str
    content_type: str = Field(description="How the function itself is stored, not how it is "
                                          "called: any function takes JSON calls.")
    payload_b64: str
    source: str | None
    python_version: str = Field(description="The Python it was registered from: a JSON call "
                                            "runs only on an endpoint of the same minor "
                                            "version (else VersionMismatch).")
    serializer: str
    owner: str
    created: float
    sharing: FunctionSharing = FunctionSharing()


class EndpointPolicy(_Body):
    """Who may send tasks to an endpoint, and which functions and serializers it takes."""

    visibility: Literal["private", "listed"] = "private"
    allowed_users: list[UserName] = Field(default_factory=list, max_length=10_000)
    allowed_groups: list[UserName] = Field(default_factory=list, max_length=1000)
    allowed_functions: list[Id] | None = Field(
        default=None, max_length=10_000,
        description="None: any function its users may run; a list: only these function ids.")
    allowed_serializers: list[TypeName] | None = Field(
        default=None, max_length=100,
        description="None: the agent's own allow-list decides; a list: only these content types.")


class EndpointIn(_Body):
    """An endpoint to create."""

    name: Name
    owner: UserName = Field(default="anonymous", description="Ignored when the registry "
                                                             "checks tokens: the caller owns it.")
    description: str = Field(default="", max_length=MAX_DESCRIPTION_LENGTH)
    policy: EndpointPolicy = EndpointPolicy()


class EndpointOut(_Body):
    """A registered endpoint."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "endpoint_id": _EXAMPLE_TASK_IDS["endpoint_id"], "name": "lab-server", "owner": "alice",
        "description": "the lab's 32-core server", "created": 1735680000.0,
        "policy": {"visibility": "listed", "allowed_users": ["gateway"], "allowed_groups": [],
                   "allowed_functions": None,
                   "allowed_serializers": ["application/json",
                                           "application/vnd.gc.cloudpickle"]}}]})

    endpoint_id: str
    name: str
    owner: str
    description: str
    created: float
    policy: EndpointPolicy = EndpointPolicy()


class EndpointStatus(_Body):
    """An endpoint's liveness, from its heartbeats; ``details`` is the last heartbeat, its
    counts (workers, busy workers, tasks) summed over the agents online, each agent's own
    heartbeat under ``agents`` (an endpoint may be served from several hosts)."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "endpoint_id": _EXAMPLE_TASK_IDS["endpoint_id"], "status": "online",
        "last_seen": 1735689600.5,
        "details": {"hostname": "node01", "engine": "processes", "workers": 4,
                    "workers_busy": 1, "period": 10, "queue_depth": 0}}]})

    endpoint_id: str
    status: Literal["online", "offline", "never seen"]
    last_seen: float | None = None
    details: dict[str, Any] = {}


class TaskEvent(_Body):
    """One state a task passed through, and when."""

    state: Literal["waiting", "received", "running", "success", "failed", "cancelled",
                   "dead-lettered"]
    at: float
    detail: str = ""


class TaskBasics(_Body):
    """Where a task went, its state and timings: what a listing shows of it."""

    task_id: str
    task_group_id: str
    endpoint_id: str
    function_id: str
    user: str
    on_behalf_of: str = ""
    status: TaskStatus
    submitted: float | None = None
    timings: Timings = Timings()
    worker: str = ""


class TaskOut(TaskBasics):
    """A task as the ledger knows it: status, timings and, once finished, its result."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        **_EXAMPLE_TASK_IDS,
        "status": "success", "submitted": 1735689599.9,
        "timings": {"received": 1735689600.0, "started": 1735689600.0012,
                    "finished": 1735689600.00135},
        "worker": "node01:4242", "content_type": "application/json",
        "payload_b64": "eyJzdW0iOjEzLjAsIm4iOjN9", "stdout": "", "stderr": "",
        "history": [{"state": "waiting", "at": 1735689599.9},
                    {"state": "success", "at": 1735689600.00135}]}, {
        **_EXAMPLE_TASK_IDS,
        "status": "failed", "content_type": "application/json",
        "error": {"type": "TypeError", "message": "unsupported operand type(s)",
                  "traceback": "Traceback (most recent call last): ..."}}]})

    content_type: str = ""
    payload_b64: str = ""
    error: ErrorInfo | None = None
    stdout: str = ""
    stderr: str = ""
    history: list[TaskEvent] = []
    result_note: str = Field(default="", description="Why the value is not kept, if it is not: "
                                                     "too large for the ledger, or expired.")


class TaskBatchIn(_Body):
    """Task ids to look up at once."""

    task_ids: list[Id] = Field(max_length=10_000)


class UserOut(_Body):
    """A user or service account."""

    name: str
    kind: Literal["user", "service"]
    admin: bool = False
    groups: list[str] = []
    created: float


class WhoAmI(_Body):
    """The identity a token stands for, as the registry sees it."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "name": "gateway", "kind": "service", "admin": False, "groups": ["lab"],
        "endpoint_id": None, "token_id": "3c5e0b9a", "auth": "tokens"}]})

    name: str
    kind: Literal["user", "service", "agent", "anonymous"]
    admin: bool = False
    groups: list[str] = []
    endpoint_id: str | None = None
    token_id: str | None = None
    auth: Literal["open", "tokens"]


class TokenIn(_Body):
    """A token to issue for the caller."""

    label: Label = ""
    lifetime: float | None = Field(
        default=None, gt=0, le=10 * 365 * 86400,
        description="Seconds until it expires; none: the longest the registry allows (its "
                    "cap, and never past the expiry of the token that asks).")
    endpoint_id: Id | None = Field(default=None, description="Issue an agent token for this "
                                                             "endpoint, which the caller owns.")


class TokenOut(_Body):
    """A token, without its secret."""

    token_id: str
    user: str
    endpoint_id: str | None = None
    label: str = ""
    created: float
    expires: float | None = None
    revoked: float | None = None
    parent: str | None = Field(default=None, description="The token that issued this one (none: "
                                                         "an administrator did); revoking it "
                                                         "revokes this one too.")

    def state(self, now: float) -> Literal["revoked", "expired", "valid"]:
        """Whether the token still works at ``now``."""
        if self.revoked:
            return "revoked"
        return "expired" if self.expires and self.expires <= now else "valid"


class IssuedToken(TokenOut):
    """A token just issued: the only time its secret is shown."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "token_id": "7a41c2d0", "user": "gateway", "label": "nightly sweep",
        "created": 1735689000.0, "expires": 1735775400.0, "parent": "3c5e0b9a",
        "token": "gct_Jx9…", "principal": "gateway"}]})

    token: str
    principal: str = Field(description="The user name to give the broker with this token.")


class TaskCheckIn(_Body):
    """A task an agent is about to run, for the registry's policy re-check."""

    user: str = Field(min_length=1, max_length=200)
    function_id: Id
    content_type: TypeName
    on_behalf_of: str = Field(default="", max_length=200)


class TaskCheckOut(_Body):
    """The re-check's answer: allowed, or refused and why."""

    allowed: bool
    reason: str = ""
