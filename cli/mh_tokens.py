"""Where a simulated MH's service token comes from (SPEC §4): minted in
memory from a signing key, or handed over ready-made.

Tokens live only in memory and are never logged; the ``repr`` of a source
names no token.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Protocol

from darktower.shared.config import Secret
from darktower.shared.keys import Ed25519PrivateKey
from darktower.shared.tokens import SERVICE_TOKEN_TTL_S, mint_mh_token

__all__ = ["MintedTokens", "StaticTokens", "TokenSource"]


class TokenSource(Protocol):
    """The current service token of an MH (``sub`` = its id)."""

    def __call__(self, handler_id: str) -> Secret: ...


class MintedTokens:
    """MH tokens minted with a signing key (a ``dt keys init`` key standing in
    for the AC), each minted again once half its lifetime has passed, so a
    simulator may run for days. Tokens live only in memory."""

    def __init__(
        self,
        private_key: Ed25519PrivateKey,
        kid: str,
        *,
        ttl_s: int = SERVICE_TOKEN_TTL_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._key = private_key
        self._kid = kid
        self._ttl_s = ttl_s
        self._clock = clock
        self._tokens: dict[str, tuple[float, Secret]] = {}

    def __repr__(self) -> str:
        return f"MintedTokens(kid={self._kid!r})"

    def __call__(self, handler_id: str) -> Secret:
        now = self._clock()
        minted = self._tokens.get(handler_id)
        if minted is None or now - minted[0] >= self._ttl_s / 2:
            token = mint_mh_token(
                self._key, kid=self._kid, mh_id=handler_id, ttl_s=self._ttl_s, now=now
            )
            minted = (now, Secret(token))
            self._tokens[handler_id] = minted
        return minted[1]


class StaticTokens:
    """Tokens handed over ready-made (one per MH); they are not renewed."""

    def __init__(self, tokens: Mapping[str, Secret]) -> None:
        self._tokens = dict(tokens)

    def __repr__(self) -> str:
        return f"StaticTokens({len(self._tokens)} tokens)"

    def __call__(self, handler_id: str) -> Secret:
        return self._tokens[handler_id]
