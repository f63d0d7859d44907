"""Keep secrets out of logs: passwords in URLs are replaced by ``***``."""

from __future__ import annotations

import re

# scheme://user:password@host — the password runs to the last "@" before the host (an unescaped
# "@" in a password must not leak its tail); no whitespace, "/", "?" or "#" inside userinfo.
_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s]*:)[^\s/?#]*@")


def mask_url(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@`` in it replaced by ``***``."""
    return _USERINFO.sub(r"\g<head>***@", text)
