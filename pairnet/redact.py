"""Keep secrets out of messages, logs and files pairnet writes.

A database URI such as ``postgresql://user:secret@host/db`` carries its password in the
clear; every message, pid file or log line that may show a URI goes through
:func:`mask_url` first.
"""

from __future__ import annotations

import re

# scheme://user:password@ — the password runs to the last "@" before the path starts
# (RFC 3986: the host follows the last "@" of the authority), so a password holding an
# unescaped "@" or ":" is masked whole. The user part may be empty (redis://:pw@host).
_CREDENTIALS = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^:/?#@\s]*:)[^/?#\s]*@")


def mask_url(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@`` in it replaced by ``***``."""
    return _CREDENTIALS.sub(lambda m: f"{m['head']}***@", text)
