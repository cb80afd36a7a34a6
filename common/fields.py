"""The kinds of value the wire contract carries, and their bounds.

Whatever a cell sends is untrusted: a number is one every layer compares exactly, a name is a
short word of the characters names use, free text is cleaned of control characters and cut to
its length. ``common/messages.py`` builds every message from these.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, Field

# Every whole number a message carries is at most this. Redis's Lua guards compare numbers as
# doubles, exact only below 2**53, and a cell's report order multiplies its generation by the
# eight reports one upgrade can make: a number above it compares one way in Python and another
# in Redis, and a write guarded on it is refused for ever.
WIRE_INT_MAX = 2**50 - 1
WireInt = Annotated[int, Field(ge=0, le=WIRE_INT_MAX)]

# What a cell writes into the control plane's records and an operator's terminal. A name is a
# short word of the characters names use (refused otherwise, the field named); free text is
# cleaned on the way in: control characters (an escape sequence would reach the terminal of
# whoever prints it) become visible escapes, and it is cut to its length.
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")]
Region = Annotated[str, Field(pattern=r"^[a-z]{2}(-[a-z]+)+-[0-9]$")]
StackName = Annotated[str, Field(pattern=r"^[A-Za-z][A-Za-z0-9-]{0,127}$")]
RoleArn = Annotated[
    str, Field(pattern=r"^arn:aws[a-z-]*:iam::[0-9]{12}:role/[A-Za-z0-9_+=,.@/-]{1,512}$")
]
# An agent's X25519 public key (common/sealing.py): 32 bytes, base64url without padding.
PublicKey = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{43}$")]
# A secret sealed to one: the ephemeral key, nonce, ciphertext and tag, base64url.
Sealed = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{100,400}$")]
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """``text`` with every control character shown as a visible escape (``\\x1b``): an
    escape sequence in it would otherwise move the cursor, clear the screen or retitle the
    window of whoever prints it."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def clean_text(limit: int) -> AfterValidator:
    """Free text as a cell may send it: printable, and cut to ``limit`` characters."""
    return AfterValidator(lambda value: printable(value)[:limit])


Text = Annotated[str, clean_text(1000)]


CELL_ID_PATTERN = r"^[a-z][a-z0-9-]{1,40}[a-z0-9]$"
# Service and operator broker users take these prefixes; a cell id never may, so a cell can
# never be given a broker user that collides with a control-plane one.
RESERVED_PREFIXES = ("svc-", "op-")

_CELL_ID_RE = re.compile(CELL_ID_PATTERN)


def cell_id_problem(value: str) -> str | None:
    """Why ``value`` is not a usable cell id, or None when it is."""
    if not _CELL_ID_RE.fullmatch(value):
        return (
            f"cell id {value!r} is not a DNS label of 3 to 42 characters "
            "(lower-case letters, digits and '-', starting with a letter)"
        )
    for prefix in RESERVED_PREFIXES:
        if value.startswith(prefix):
            return f"cell id {value!r} uses the reserved prefix {prefix!r}"
    return None


def _check_cell_id(value: str) -> str:
    problem = cell_id_problem(value)
    if problem:
        raise ValueError(problem)
    return value


CellId = Annotated[str, AfterValidator(_check_cell_id)]
Digest = Annotated[str, Field(pattern=r"^sha256:[0-9a-f]{64}$")]
Version = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[0-9A-Za-z.+-]+$")]
