"""Credentials out of what the user sees: URLs in messages and logs name the host, never the user
name or password. No imports beyond the standard library: the lean stages use it too."""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit


def redact(url: str) -> str:
    """The URL without user name or password, for messages and logs."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


CREDENTIALS = re.compile(r"//[^/@\s]+@")  # user:password@ in a URL


def redact_text(text: str) -> str:
    """A message with the credentials of every URL in it hidden (as other programs' errors quote URLs)."""
    return CREDENTIALS.sub("//***@", text)
