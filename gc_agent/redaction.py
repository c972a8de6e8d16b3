"""Take secrets out of text and data before they leave the machine (``gc-agent diagnose``).

Two nets: the secrets known by value (the agent's token, ``GC_TOKEN``, the passwords in the
broker URLs, any setting whose name says it is secret), each replaced wherever it occurs,
as written and URL-encoded; and the shapes a secret has even when its value is not known
here (a URL's password, a registry token ``gct_…``, an ``Authorization`` header, a
``password=`` pair). Pure: no files, no network.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote, unquote, urlsplit

__all__ = ["MASK", "Redactor", "is_secret_name", "url_passwords"]

#: What a secret is replaced with.
MASK = "***"
#: Shorter "secrets" would mask ordinary words: a real token or password is longer.
_SHORTEST_SECRET = 4
#: Names of settings (environment variables, config keys) whose values are secret.
_SECRET_NAME = re.compile(r"(token|password|passwd|secret|credential|api[_-]?key|private[_-]?key)$",
                          re.IGNORECASE)
#: The shapes of secrets whose values are not known here.
_SHAPES: tuple[tuple[re.Pattern[str], str], ...] = (
    # scheme://user:password@host -> scheme://user:***@host
    (re.compile(r"(\b[a-z][a-z0-9+.-]*://[^\s:/@]*:)[^\s@/]+@", re.IGNORECASE), rf"\g<1>{MASK}@"),
    # a registry token
    (re.compile(r"\bgct_[A-Za-z0-9_-]+"), f"gct_{MASK}"),
    # an HTTP Authorization header's credentials
    (re.compile(r"\b(Bearer|Basic)\s+[A-Za-z0-9._~+/=-]+", re.IGNORECASE), rf"\g<1> {MASK}"),
    # password=..., "token": "...", secret: ...
    (re.compile(r"((?:password|passwd|token|secret)[\"']?\s*[:=]\s*[\"']?)[^\s\"',;&]+",
                re.IGNORECASE), rf"\g<1>{MASK}"),
)


def is_secret_name(name: str) -> bool:
    """Whether a setting called ``name`` holds a secret (``GC_TOKEN``, ``db_password``, …);
    a file that holds one (``token_file``) is not itself secret."""
    return bool(_SECRET_NAME.search(name))


def url_passwords(urls: str) -> list[str]:
    """The passwords in a URL, or in URLs separated by commas (a cluster's nodes)."""
    found = []
    for url in urls.split(","):
        try:
            password = urlsplit(url.strip()).password
        except ValueError:  # not a URL at all: nothing to find
            continue
        if password:
            found.append(password)
    return found


class Redactor:
    """Masks the given secrets, and anything shaped like one, in text and in data."""

    def __init__(self, secrets: Iterable[str]) -> None:
        known = {form for secret in secrets if len(secret) >= _SHORTEST_SECRET
                 for form in (secret, quote(secret, safe=""), unquote(secret))}
        # Longest first, so a secret that contains another is masked whole.
        self._secrets = sorted(known, key=len, reverse=True)

    def text(self, text: str) -> str:
        """``text`` with every known secret and every secret-shaped string masked."""
        for secret in self._secrets:
            text = text.replace(secret, MASK)
        for shape, replacement in _SHAPES:
            text = shape.sub(replacement, text)
        return text

    def data(self, value: Any) -> Any:
        """A copy of JSON-like ``value``: strings masked as :meth:`text` does, and the value
        of every key :func:`is_secret_name` calls secret replaced whole."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, Mapping):
            return {key: MASK if is_secret_name(str(key)) and item not in (None, "")
                    else self.data(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.data(item) for item in value]
        return value
