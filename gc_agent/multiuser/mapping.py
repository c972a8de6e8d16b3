"""Identity mapping: which local account a registry identity runs as.

Rules are tried in order: the first whose ``match`` (a regular expression that must
match the whole identity) fits gives the account name from its ``output`` template
(``{0}`` is the first group, ``{name}`` a named one). An external command may be used
instead, as Globus Compute allows: it gets the identity on stdin and prints the account
name, or nothing for "no match". Root is never a valid target.
"""

from __future__ import annotations

import pwd
import re
import subprocess
from collections.abc import Sequence

from gc_agent.config import IdentityRule
from gc_agent.engines.processes import Account
from gc_core.errors import PolicyError

__all__ = ["IdentityRule", "lookup_account", "map_identity"]

#: Seconds an external mapping command may take.
MAPPING_COMMAND_TIMEOUT = 10.0


def map_identity(identity: str, rules: Sequence[IdentityRule], command: str | None = None) -> str:
    """The local account name for ``identity``.

    Raises:
        PolicyError: no rule matches, or the command finds no account.
    """
    for rule in rules:
        found = re.fullmatch(rule.match, identity)
        if found:
            return rule.output.format(*found.groups(), **found.groupdict())
    if command:
        done = subprocess.run(command, shell=True, input=identity, capture_output=True,
                              text=True, timeout=MAPPING_COMMAND_TIMEOUT)
        name = done.stdout.strip()
        if done.returncode == 0 and name:
            return name
    raise PolicyError(f"identity {identity!r} has no local account on this endpoint: no "
                      "identity mapping rule matches it; ask the endpoint's administrator")


def lookup_account(name: str, identity: str) -> Account:
    """The local account ``name``; never root.

    Raises:
        PolicyError: no such account, or it is root.
    """
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise PolicyError(f"identity {identity!r} maps to {name!r}, which is not an account "
                          "on this machine") from None
    if entry.pw_uid == 0:
        raise PolicyError(f"identity {identity!r} maps to {name!r}, which is root: tasks never "
                          "run as root")
    return Account(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir, entry.pw_shell)
