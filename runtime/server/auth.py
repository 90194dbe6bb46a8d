"""Optional bearer-token auth. The key file holds one key per line (several allow rotation; blank lines
and `#` comments are skipped). Only SHA-256 digests of the keys are kept, so the configuration that
travels to Ray replicas carries no secret, and a token is checked against every digest in constant time."""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
import warnings
from pathlib import Path

from ..errors import InputError


class KeyFileWarning(UserWarning):
    """The API key file is readable by other users."""


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def load_key_digests(path: str | os.PathLike) -> tuple[bytes, ...]:
    """Digests of the keys in `path`; InputError if it cannot be read or holds no key."""
    path = Path(path)
    try:
        text = path.read_text()
        mode = path.stat().st_mode
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"--api-key-file {path}: cannot read ({e})") from None
    keys = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not keys:
        raise InputError(f"--api-key-file {path} holds no key (one key per line)")
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        warnings.warn(f"--api-key-file {path} is readable by other users (chmod 600 it)", KeyFileWarning, stacklevel=2)
    return tuple(digest(k) for k in keys)


def authorized(header: str | None, digests: tuple[bytes, ...]) -> bool:
    """Whether an `Authorization` header carries one of the keys. No digests: auth is off."""
    if not digests:
        return True
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return False
    candidate = digest(token.strip())
    ok = False
    for known in digests:  # no early exit: the time taken does not depend on which key matched
        ok |= hmac.compare_digest(candidate, known)
    return ok
