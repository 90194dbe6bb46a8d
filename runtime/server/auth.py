"""Optional bearer-token auth. The key file holds one key per line (several allow rotation; blank lines
and `#` comments are skipped). Only SHA-256 digests of the keys are kept, so the configuration that
travels to Ray replicas carries no secret, and a token is checked against every digest in constant time.

Keys are printable ASCII, refused at startup otherwise: HTTP clients encode a non-ASCII header value
differently (latin-1, UTF-8, or not at all), so such a key would match for some clients and not others.
A token is compared as the bytes the client sent."""

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


def digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


def check_key(key: str, where: str) -> bytes:
    """The key as the bytes a client sends; InputError if it is not printable ASCII."""
    bad = next((c for c in key if not (" " < c <= "~")), None)
    if bad is not None:
        raise InputError(f"{where}: the key holds {bad!r} (U+{ord(bad):04X}); keys must be printable ASCII without "
                         "spaces, because HTTP clients send other characters in different encodings")
    return key.encode("ascii")


def load_key_digests(path: str | os.PathLike) -> tuple[bytes, ...]:
    """Digests of the keys in `path`; InputError if it cannot be read or holds no key."""
    path = Path(path)
    try:
        text = path.read_text()
        mode = path.stat().st_mode
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"--api-key-file {path}: cannot read ({e})") from None
    keys = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)
            if line.strip() and not line.lstrip().startswith("#")]
    if not keys:
        raise InputError(f"--api-key-file {path} holds no key (one key per line)")
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        warnings.warn(f"--api-key-file {path} is readable by other users (chmod 600 it)", KeyFileWarning, stacklevel=2)
    return tuple(digest(check_key(k, f"--api-key-file {path} line {n}")) for n, k in keys)


def authorized(header: str | None, digests: tuple[bytes, ...]) -> bool:
    """Whether an `Authorization` header carries one of the keys. No digests: auth is off."""
    if not digests:
        return True
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return False
    # Starlette decodes header bytes as latin-1: encoding back gives exactly the bytes the client sent.
    candidate = digest(token.strip().encode("latin-1", "replace"))
    ok = False
    for known in digests:  # no early exit: the time taken does not depend on which key matched
        ok |= hmac.compare_digest(candidate, known)
    return ok
