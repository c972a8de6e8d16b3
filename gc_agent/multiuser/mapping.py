"""Identity mapping: which local account a registry identity runs as.

Rules are tried in order: the first whose ``match`` (a regular expression that must
match the whole identity) fits gives the account name from its ``output`` template
(``{0}`` is the first group, ``{name}`` a named one). An external command may be used
instead, as Globus Compute allows: it gets the identity on stdin and prints the account
name, or nothing for "no match".

Whatever a rule or command says, tasks run only as ordinary people's accounts. Root is
never a target. Neither is a system account (uid below ``UID_MIN`` in /etc/login.defs), an
account whose primary or supplementary group is 0, or a member of a privileged group
(``PRIVILEGED_GROUPS``): one loose rule (``(.*)@uni.edu`` -> ``{0}``) must not let
``backup@uni.edu`` or ``admin@uni.edu`` run code as a system or sudo-capable account.
An administrator who really means one of those lists it by name in
``multi_user.allowed_privileged_accounts``; root stays refused even then.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import subprocess
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

from gc_agent.config import IdentityRule
from gc_agent.engines.processes import Account
from gc_core.errors import ConfigError, PolicyError

__all__ = [
    "DEFAULT_UID_MIN",
    "PRIVILEGED_GROUPS",
    "IdentityRule",
    "lookup_account",
    "map_identity",
    "parse_uid_min",
    "privilege_refusal",
]

#: Seconds an external mapping command may take.
MAPPING_COMMAND_TIMEOUT = 10.0
#: Where shadow-utils keeps the lowest uid of a person's account (``UID_MIN``).
LOGIN_DEFS = Path("/etc/login.defs")
#: ``UID_MIN`` when login.defs does not say: the value Debian, Ubuntu and Red Hat ship.
DEFAULT_UID_MIN = 1000
#: Groups whose members are, or can easily become, root, or can read what only root should:
#: sudo rights (sudo, wheel, admin), the container and VM daemons' sockets (docker, lxd,
#: libvirt), raw disks and kernel memory (disk, kmem), password hashes (shadow), system logs
#: (adm, systemd-journal), and /usr/local, on root's PATH and import path (staff on Debian).
PRIVILEGED_GROUPS = frozenset({"root", "sudo", "wheel", "admin", "docker", "lxd", "libvirt",
                               "disk", "kmem", "shadow", "adm", "systemd-journal", "staff"})
#: Where an administrator lists the privileged accounts tasks may run as anyway.
ALLOW_LIST_SETTING = "multi_user.allowed_privileged_accounts"


def map_identity(identity: str, rules: Sequence[IdentityRule], command: str | None = None) -> str:
    """The local account name for ``identity``.

    Raises:
        PolicyError: no rule matches, or the command finds no account.
        ConfigError: a rule's output names a group its match lacks, or the command fails.
    """
    for rule in rules:
        found = re.fullmatch(rule.match, identity)
        if found:
            try:
                return rule.output.format(*found.groups(), **found.groupdict())
            except (IndexError, KeyError) as exc:
                raise ConfigError(f"identity mapping rule {rule.match!r} has output "
                                  f"{rule.output!r}, which names a group its match does not "
                                  f"have ({exc}); the endpoint's administrator must fix the "
                                  "rule") from None
    if command:
        try:
            done = subprocess.run(command, check=False, shell=True, input=identity,
                                  capture_output=True, text=True, timeout=MAPPING_COMMAND_TIMEOUT)
        except (OSError, subprocess.SubprocessError) as exc:
            raise ConfigError(f"the identity mapping command failed ({exc}); the endpoint's "
                              "administrator must fix identity_mapping_command") from None
        name = done.stdout.strip()
        if done.returncode == 0 and name:
            return name
    raise PolicyError(f"identity {identity!r} has no local account on this endpoint: no "
                      "identity mapping rule matches it; ask the endpoint's administrator")


def lookup_account(name: str, identity: str, *, allowed: Collection[str] = frozenset()) -> Account:
    """The local account ``name``: never root, nor a privileged account not in ``allowed``.

    Raises:
        PolicyError: no such account, it is root, or it is privileged (the message says how).
    """
    try:
        entry = pwd.getpwnam(name)
    except (KeyError, ValueError):  # ValueError: a NUL in the name
        raise PolicyError(f"identity {identity!r} maps to {name!r}, which is not an account "
                          "on this machine") from None
    account = Account(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir, entry.pw_shell)
    refusal = privilege_refusal(account, _groups_of(account), uid_min=_uid_min(),
                                allowed=allowed)
    if refusal is not None:
        raise PolicyError(f"identity {identity!r} maps to {name!r}, which {refusal}")
    return account


def privilege_refusal(account: Account, groups: Mapping[int, str], *, uid_min: int,
                      allowed: Collection[str] = frozenset()) -> str | None:
    """Why tasks may not run as ``account`` (None: they may).

    ``groups`` maps the gid of each group the account is in (primary and supplementary)
    to its name ("" when the group has none).
    """
    if account.uid == 0:
        return "is root: tasks never run as root"
    if account.name in allowed:
        return None
    if account.uid < uid_min:
        reason = (f"is a system account (uid {account.uid}, below UID_MIN {uid_min} from "
                  f"{LOGIN_DEFS})")
    elif 0 in groups or account.gid == 0:
        reason = "is in group 0 (root's group)"
    elif privileged := sorted(PRIVILEGED_GROUPS.intersection(groups.values())):
        reason = f"is in the privileged group {privileged[0]!r}"
    else:
        return None
    return (f"{reason}: tasks run only as ordinary accounts; an administrator who means it "
            f"lists the account in {ALLOW_LIST_SETTING}")


def parse_uid_min(login_defs: str) -> int:
    """``UID_MIN`` from the text of /etc/login.defs, else ``DEFAULT_UID_MIN``."""
    for line in login_defs.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "UID_MIN" and words[1].isdigit():
            return int(words[1])
    return DEFAULT_UID_MIN


def _uid_min() -> int:
    try:
        return parse_uid_min(LOGIN_DEFS.read_text(errors="replace"))
    except OSError:
        return DEFAULT_UID_MIN


def _groups_of(account: Account) -> dict[int, str]:
    """Every group ``account`` is in, by gid: what initgroups will give its workers."""
    groups: dict[int, str] = {}
    for gid in os.getgrouplist(account.name, account.gid):
        try:
            groups[gid] = grp.getgrgid(gid).gr_name
        except KeyError:
            groups[gid] = ""
    return groups
