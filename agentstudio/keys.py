"""API keys: their format, generation and the hash that is all ingest ever sees.

A key is `as_<mode>_<base62>` with 32 random base62 characters (about 190 bits). Because the key is
high-entropy, a plain SHA-256 is a safe verifier (no slow KDF needed) and keeps lookups O(1).
"""

from __future__ import annotations

import hashlib
import re
import secrets
import string

from agentstudio.resources import Mode

_ALPHABET = string.ascii_letters + string.digits
_RANDOM_CHARS = 32
KEY_PATTERN = re.compile(r"^as_(live|test)_[A-Za-z0-9]{%d,128}$" % _RANDOM_CHARS)


def generate(mode: Mode) -> str:
    return f"as_{mode}_" + "".join(secrets.choice(_ALPHABET) for _ in range(_RANDOM_CHARS))


def is_well_formed(key: str) -> bool:
    return KEY_PATTERN.match(key) is not None


def digest(key: str) -> str:
    """Hex SHA-256 of the key: the only form of a key that leaves the operator."""
    return hashlib.sha256(key.encode()).hexdigest()


def hint(key: str) -> str:
    """What people may see of a key: its prefix and last four characters."""
    prefix = key[: key.index("_", 3) + 1] if key.count("_") >= 2 else ""
    return f"{prefix}…{key[-4:]}"
