"""The registry's HTTP request and response bodies, shared by the service and its client."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from gc_core.protocol import ErrorInfo, Timings

__all__ = [
    "MAX_DESCRIPTION_LENGTH",
    "MAX_FUNCTION_B64_LENGTH",
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
#: Longest serialized function, as base64 (16 MiB of bytes).
MAX_FUNCTION_B64_LENGTH = 4 * (16 * 2**20 // 3 + 1)

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
    """A registered function."""

    function_id: str
    name: str
    content_hash: str
    content_type: str
    payload_b64: str
    source: str | None
    python_version: str
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

    endpoint_id: str
    name: str
    owner: str
    description: str
    created: float
    policy: EndpointPolicy = EndpointPolicy()


class EndpointStatus(_Body):
    """An endpoint's liveness, from its heartbeats."""

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


class TaskOut(_Body):
    """A task as the ledger knows it: status, timings and, once finished, its result."""

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
