"""Ed25519 signing keys: generation, PEM files, public JWKs and their ``kid``.

Every token in the system is EdDSA (Ed25519), so this module knows exactly one
key type. The ``kid`` of a key is its RFC 7638 thumbprint: it is derived from
the public key alone, so the GC, the ``dt`` CLI and any validator compute the
same id for the same key without coordinating, and a JWKS can never claim a
``kid`` for the wrong key by accident.

Nothing here logs, and no exception message or ``repr`` carries key material:
errors name the *file*, never its contents.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

__all__ = [
    "Ed25519PrivateKey",
    "Ed25519PublicKey",
    "KeyFileError",
    "b64url_decode",
    "b64url_encode",
    "generate_private_key",
    "jwks_document",
    "key_id",
    "load_private_key",
    "okp_thumbprint",
    "public_jwk",
    "save_private_key",
    "write_jwks",
]

#: A private key file is readable by its owner only; anything wider would let
#: another local user mint tokens.
PRIVATE_KEY_MODE = 0o600


class KeyFileError(Exception):
    """A key file is missing, unreadable, or not an Ed25519 private key.

    The message names the path and the problem, never the file's contents.
    """


def b64url_encode(data: bytes) -> str:
    """Base64url without padding, as every JOSE field uses (RFC 7515 §2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Strict inverse of :func:`b64url_encode`; :class:`ValueError` on bad input.

    :mod:`base64` silently skips characters outside the alphabet and ignores
    stray trailing bits, so many strings would decode to the same key; only
    the one canonical spelling is accepted, keeping ``x`` → ``kid`` one-to-one.
    """
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError):
        raise ValueError("not base64url") from None
    if b64url_encode(data) != text:
        raise ValueError("not canonical unpadded base64url")
    return data


def generate_private_key() -> Ed25519PrivateKey:
    """A fresh Ed25519 private key from the OS CSPRNG."""
    return Ed25519PrivateKey.generate()


def okp_thumbprint(x: str, *, crv: str = "Ed25519") -> str:
    """The RFC 7638 thumbprint of an OKP public key given as its ``x`` member.

    RFC 8037 §2 fixes the required members of an OKP key as ``crv``, ``kty``
    and ``x``; RFC 7638 hashes them as lexicographically ordered JSON without
    whitespace. ``sort_keys`` and compact separators produce exactly that,
    because every member value is plain ASCII that JSON never escapes.
    """
    canonical = json.dumps(
        {"crv": crv, "kty": "OKP", "x": x}, separators=(",", ":"), sort_keys=True
    )
    return b64url_encode(hashlib.sha256(canonical.encode("utf-8")).digest())


def _raw_public_bytes(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(
        encoding=serialization.Encoding.Raw, format=serialization.PublicFormat.Raw
    )


def key_id(public_key: Ed25519PublicKey) -> str:
    """The ``kid`` for ``public_key``: its RFC 7638 thumbprint."""
    return okp_thumbprint(b64url_encode(_raw_public_bytes(public_key)))


def public_jwk(public_key: Ed25519PublicKey) -> dict[str, str]:
    """The public JWK for ``public_key``, ready to publish in a JWKS.

    ``alg`` and ``use`` are included so that validators which honour them
    (ours does) never try this key for anything but EdDSA signatures.
    """
    x = b64url_encode(_raw_public_bytes(public_key))
    return {
        "kty": "OKP",
        "crv": "Ed25519",
        "x": x,
        "kid": okp_thumbprint(x),
        "alg": "EdDSA",
        "use": "sig",
    }


def jwks_document(public_keys: Sequence[Ed25519PublicKey]) -> dict[str, list[dict[str, str]]]:
    """A JWKS (RFC 7517 §5) holding the public JWKs of ``public_keys``.

    The GC serves this at ``/.well-known/jwks.json``; ``dt keys init`` writes it
    to a file.
    """
    return {"keys": [public_jwk(key) for key in public_keys]}


def _write_private(path: Path, data: bytes, *, overwrite: bool) -> None:
    # The file is created with its final mode in one open() call, so there is
    # no window in which the key sits on disk world-readable (umask can only
    # narrow the mode further). An existing file keeps its inode, so fchmod it.
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    fd = os.open(path, flags, PRIVATE_KEY_MODE)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), PRIVATE_KEY_MODE)
        f.write(data)


def save_private_key(
    private_key: Ed25519PrivateKey, path: str | os.PathLike[str], *, overwrite: bool = False
) -> None:
    """Write ``private_key`` as unencrypted PKCS#8 PEM with mode 0600.

    Refuses (:class:`FileExistsError`) to replace an existing file unless
    ``overwrite``: replacing a signing key silently invalidates every token
    minted with it.
    """
    pem = private_key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )
    _write_private(Path(path), pem, overwrite=overwrite)


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """Read an unencrypted PEM Ed25519 private key.

    Raises :class:`KeyFileError` naming ``path`` if the file is missing,
    unreadable, or holds anything else (an RSA key, a public key, garbage).
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"signing key not found: {p}") from None
    except OSError as exc:
        raise KeyFileError(f"cannot read signing key {p}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # The library's message may quote parts of the input: drop it.
        raise KeyFileError(f"not an unencrypted PEM private key: {p}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"not an Ed25519 private key: {p}")
    return key


def write_jwks(path: str | os.PathLike[str], jwks: Sequence[Mapping[str, str]]) -> None:
    """Write ``{"keys": [...]}`` to ``path`` (public material: default file mode).

    The document is written to a sibling temporary file and renamed into place
    so that a validator re-reading the file never sees half of it.
    """
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text(json.dumps({"keys": [dict(k) for k in jwks]}, indent=2) + "\n")
    tmp.replace(p)
