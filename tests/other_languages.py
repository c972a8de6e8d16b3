"""Run the Node.js and Go clients of ``examples/`` as an integrator would, and read what they print."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.toolchains import ROOT, go_environment, node_modules

#: The languages of the example clients, each a single file.
LANGUAGES = ("node", "go")
NODE_CLIENT = ROOT / "examples" / "node" / "raw_amqp_client.js"
GO_CLIENT = ROOT / "examples" / "go" / "raw_amqp_client.go"
#: Seconds a client may wait for its results before it gives up.
RESULT_TIMEOUT = 60


@dataclass(frozen=True)
class ClientRun:
    """What one run of an example client printed: an outcome per call, in order."""

    returncode: int
    outcomes: list[dict[str, Any]]
    stderr: str


class ExampleClients:
    """The example clients, ready to run (the Go one built once into ``build_dir``)."""

    def __init__(self, build_dir: Path) -> None:
        self._build_dir = build_dir
        self._commands: dict[str, list[str]] = {}
        self._env: dict[str, dict[str, str]] = {}

    def prepare(self, language: str) -> None:
        """Install the language's toolchain if missing, and build its client."""
        if language in self._commands:
            return
        if language == "node":
            self._env[language] = {"NODE_PATH": str(node_modules()), "PATH": "/usr/bin:/bin"}
            self._commands[language] = ["node", str(NODE_CLIENT)]
            return
        env = go_environment()
        binary = self._build_dir / "raw_amqp_client"
        subprocess.run(["go", "build", "-o", str(binary), str(GO_CLIENT)], env=env, check=True,
                       capture_output=True, timeout=300)
        self._env[language], self._commands[language] = env, [str(binary)]

    def run(self, language: str, broker_url: str, endpoint_id: str, function_id: str,
            *calls: dict[str, Any]) -> ClientRun:
        """Submit ``calls`` through the ``language`` client; one outcome per call comes back."""
        self.prepare(language)
        flag = "--" if language == "node" else "-"
        argv = [*self._commands[language], f"{flag}broker-url", broker_url, f"{flag}endpoint",
                endpoint_id, f"{flag}function", function_id,
                f"{flag}timeout", f"{RESULT_TIMEOUT}" if language == "node" else f"{RESULT_TIMEOUT}s",
                *(json.dumps(call) for call in calls)]
        done = subprocess.run(argv, env=self._env[language], capture_output=True, text=True,
                              timeout=RESULT_TIMEOUT + 60)
        outcomes = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
        return ClientRun(done.returncode, outcomes, done.stderr)
