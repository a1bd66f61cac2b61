"""Keys under which layers share per-request facts through ``scope["state"]``.

The auth layer stores one frozen :class:`Principal`; rate limits and the ACL read it and never
parse the token again. The client-address layer stores the address key the limiter uses.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Literal

PRINCIPAL = "principal"
CLIENT_ADDRESS = "client_address"
REQUEST_ID = "request_id"

Role = Literal["owner", "member"]
ROLES: tuple[Role, ...] = ("owner", "member")
# Higher number, more power. The ACL compares a principal's rank with a rule's least role.
ROLE_RANK: dict[str, int] = {"member": 1, "owner": 2}


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a verified runtime token speaks for. Built once per token, cached with it."""

    subject: str
    role: Role
    instance_id: str
    session_id: str
    token_id: str
    expires_at: float
    email: str | None = None
    email_verified: bool = False
    name: str | None = None
    claims: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def profile(self) -> dict[str, Any]:
        """The profile the Room UI reads from ``/api/auth/verify``."""
        return {
            "id": self.subject,
            "email": self.email,
            "emailVerified": self.email_verified,
            "name": self.name,
        }


def state_of(scope: MutableMapping[str, Any]) -> dict[str, Any]:
    """The mutable per-request state dict, created on first use."""
    state: dict[str, Any] | None = scope.get("state")
    if state is None:
        state = {}
        scope["state"] = state
    return state


def principal_of(scope: Mapping[str, Any]) -> Principal | None:
    state: dict[str, Any] | None = scope.get("state")
    principal: Principal | None = state.get(PRINCIPAL) if state else None
    return principal
