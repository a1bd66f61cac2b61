"""Which throttle budgets a sign-in or a mail request spends (issue 12, item 7).

One budget keyed on the account alone lets anyone lock the owner out (five wrong passwords from
five addresses did) or spend the owner's reset mails. So every request is attributed to a
*requester*: the known device (see :mod:`control_plane.auth.devices`) when it carries a cookie
naming this account, else its address. Then:

- **per account and requester** (``*_account_address``): what one address, or one known device,
  may do to one account. Guessing from one address gets exactly what one account allowed before;
  nobody else's address or device is affected.
- **per address** (``*_address``) and **per account, all addresses together**
  (``*_account``, the ceiling): for unknown devices only. The ceiling bounds guessing (and mail)
  spread over many addresses; once spent, unknown devices wait, while the owner's known devices
  do not — nor does a browser that completes a password reset (it becomes known).

Counters are keyed on the normalized email whether or not an account exists, and checked before
the database is read, so a refusal says nothing about who has an account.
"""

from __future__ import annotations

from dataclasses import dataclass

from control_plane.auth.devices import KnownDevice, KnownDevices
from control_plane.errors import Throttled
from control_plane.throttle import Throttle


@dataclass(frozen=True, slots=True)
class Requester:
    """Who asks about ``account`` (a normalized email): a known device or an address."""

    account: str
    address: str
    device: KnownDevice | None

    @property
    def known(self) -> bool:
        return self.device is not None

    @property
    def pair(self) -> str:
        who = f"device:{self.device.id}" if self.device else f"address:{self.address}"
        return f"{self.account}\0{who}"


def requester(
    devices: KnownDevices, account: str, address: str, device: KnownDevice | None
) -> Requester:
    """``device`` counts only when its cookie names ``account``; a cookie of another account
    (the attacker's own, say) leaves the request an unknown device at its address."""
    known = device if device is not None and device.knows(devices.tag(account)) else None
    return Requester(account, address, known)


async def before_sign_in(throttle: Throttle, who: Requester) -> None:
    """Refuse (429) before the password is checked, right or wrong, when over a budget."""
    if not who.known:
        await throttle.hit("login_address", who.address)
        await throttle.check("login_account", who.account)
    await throttle.check("login_account_address", who.pair)


async def failed_sign_in(throttle: Throttle, who: Requester) -> None:
    """Count a wrong password against the requester, and the ceiling for unknown devices.

    Both are counted even when the first refuses (requests racing past :func:`before_sign_in`),
    so no guess escapes the ceiling."""
    counts = [("login_account_address", who.pair)]
    if not who.known:
        counts.append(("login_account", who.account))
    refused: Throttled | None = None
    for policy, key in counts:
        try:
            await throttle.hit(policy, key)
        except Throttled as exc:
            refused = refused or exc
    if refused is not None:
        raise refused


async def before_mail(throttle: Throttle, who: Requester) -> None:
    """Forgot-password and resend-verification. The narrow budgets first, so an address that is
    over its own budget does not spend the account's ceiling."""
    if not who.known:
        await throttle.hit("email_address", who.address)
    await throttle.hit("email_account_address", who.pair)
    if not who.known:
        await throttle.hit("email_account", who.account)
