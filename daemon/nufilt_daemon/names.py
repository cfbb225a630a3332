"""File names from the inbox as text that is safe to store and show.

A name on Linux is any bytes but '/' and NUL: it may not be UTF-8 (Python gives lone surrogates,
which SQLite cannot encode) and may hold newlines or terminal escapes (which would forge lines in
`nufilt history` or rewrite the terminal). `printable` maps every such name to plain printable
text: undecodable bytes as \\xNN, control characters as \\n, \\x1b, ...
"""

from __future__ import annotations

import re

_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_UNSAFE_STAGED = re.compile(r"[^\w.+@=-]")


def printable(text: str) -> str:
    decoded = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    if decoded.isprintable():
        return decoded
    return "".join(c if c.isprintable() else _ESCAPES.get(c, f"\\x{ord(c):02x}" if ord(c) < 256
                                                         else f"\\u{ord(c):04x}") for c in decoded)


def staged_name(name: str) -> str:
    """The name of the daemon's own copy: the original when printable, else a tame version (the
    suffix, which says file vs index, is kept)."""
    if printable(name) == name:
        return name
    return _UNSAFE_STAGED.sub("_", printable(name)) or "checkpoint"
