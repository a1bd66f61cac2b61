"""The pages of the cloud flow: server-rendered shells (Jinja2) with a little plain JavaScript.

Every page is a template plus an external script under ``/static`` (no inline script, so the
Content-Security-Policy forbids them). Data comes from the JSON API the scripts call with the
session cookie and the CSRF header; the server decides only who may see a page. A private page
visited without a live session redirects to ``/signin?next=<the page>``; ``next`` is accepted only
as a local path (no open redirect: ``//evil.example``, ``/\\evil.example`` and absolute URLs are
refused).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Final
from urllib.parse import quote, urlsplit

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from control_plane.auth.cookies import cookie_names
from control_plane.auth.models import User
from control_plane.auth.service import AuthContext
from control_plane.deps import authenticate_request
from control_plane.errors import ControlPlaneError
from control_plane.pages.pwa import OFFLINE_PATH, pwa_router, release_id
from control_plane.services import services_of

HERE: Final = Path(__file__).parent
TEMPLATES_DIR: Final = HERE / "templates"
STATIC_DIR: Final = HERE / "static"
STATIC_PREFIX: Final = "/static"

#: Pages load their scripts, styles and data from this origin only; no inline script or style,
#: no plugins, no framing, no <base> tricks; forms may only post back here.
PAGE_CSP: Final = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
#: Private pages show a person's data: never stored by any cache, never sent as a Referer.
PRIVATE_HEADERS: Final = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": PAGE_CSP,
    "Referrer-Policy": "no-referrer",
}
#: Public pages change with the visitor (signed in or not): revalidate, keep out of shared caches.
PUBLIC_HEADERS: Final = {
    "Cache-Control": "private, no-cache",
    "Content-Security-Policy": PAGE_CSP,
    "Referrer-Policy": "no-referrer",
    "Vary": "Cookie",
}
DEFAULT_NEXT: Final = "/app"
MAX_NEXT_LENGTH: Final = 512
#: Instance ids as the API issues them (UUIDs or similar); anything else never reaches a page.
_ID_RE: Final = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_NEXT_FORBIDDEN: Final = re.compile(r"[\\\x00-\x1f\x7f]")


def safe_next(value: str | None, default: str = DEFAULT_NEXT) -> str:
    """``value`` if it is a path on this site, else ``default``.

    Refused: absolute and scheme-relative URLs (``https://x``, ``//x``), backslashes (browsers
    read ``/\\x`` as ``//x``), control characters (``/\\t/x``), and anything over 512 chars.
    """
    if not value or len(value) > MAX_NEXT_LENGTH:
        return default
    if not value.startswith("/") or value.startswith("//") or _NEXT_FORBIDDEN.search(value):
        return default
    parts = urlsplit(value)
    if parts.scheme or parts.netloc:
        return default
    return value


def _static_versions() -> dict[str, str]:
    """A short content hash per static file, appended as ``?v=`` so an edit is never stale."""
    versions: dict[str, str] = {}
    for path in STATIC_DIR.rglob("*"):
        if path.is_file():
            digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
            versions[path.relative_to(STATIC_DIR).as_posix()] = digest
    return versions


def build_templates() -> Jinja2Templates:
    templates = Jinja2Templates(directory=str(TEMPLATES_DIR))
    versions = _static_versions()

    def static(name: str) -> str:
        version = versions.get(name)
        url = f"{STATIC_PREFIX}/{name}"
        return f"{url}?v={version}" if version else url

    templates.env.globals["static"] = static
    # Names the service worker's cache; also in every page, for the "updated" notice (issue 17).
    templates.env.globals["release"] = release_id(STATIC_DIR, TEMPLATES_DIR)
    return templates


async def _viewer(request: Request) -> User | None:
    """The signed-in person, or ``None`` (no cookie, or a token that no longer holds)."""
    services = services_of(request)
    core = services.core
    if not request.cookies.get(cookie_names(core.settings).access):
        return None
    async with core.session_factory() as db:
        try:
            auth = await authenticate_request(request, db, services.get(AuthContext), core.clock())
        except ControlPlaneError:
            return None
    return auth.user if auth is not None else None


Viewer = Annotated[User | None, Depends(_viewer)]


@dataclass(frozen=True, slots=True)
class PageContext:
    """What every template gets: the viewer and a few settings."""

    viewer: User | None
    google_enabled: bool
    development: bool


def _page(
    request: Request,
    template: str,
    viewer: User | None,
    *,
    private: bool,
    status_code: int = 200,
    **context: Any,
) -> HTMLResponse:
    services = services_of(request)
    settings = services.core.settings
    templates = services.get(Jinja2Templates)
    headers: Mapping[str, str] = PRIVATE_HEADERS if private else PUBLIC_HEADERS
    return templates.TemplateResponse(
        request,
        template,
        {
            "page": PageContext(viewer, settings.google_enabled, settings.development),
            **context,
        },
        status_code=status_code,
        headers=dict(headers),
    )


def _to_signin(request: Request) -> RedirectResponse:
    target = request.url.path
    if request.url.query:
        target = f"{target}?{request.url.query}"
    target = safe_next(target)
    return RedirectResponse(
        f"/signin?next={quote(target, safe='/')}",
        status_code=303,
        headers={"Cache-Control": "no-store"},
    )


router = APIRouter(include_in_schema=False)


# -- public pages -------------------------------------------------------------------------------


@router.get("/", response_class=HTMLResponse)
async def landing(request: Request, viewer: Viewer) -> Response:
    return _page(request, "landing.html", viewer, private=False)


NextParam = Annotated[str | None, Query(alias="next", max_length=MAX_NEXT_LENGTH * 2)]


#: What the sign-in page says when Google's callback sends a person back with ``?error=code``.
#: Only these codes are shown; anything else in the parameter is ignored (never echoed).
SIGNIN_ERRORS = {
    "oauth_state_mismatch": "The Google sign-in expired or was started in another browser. "
    "Please try again.",
    "oauth_provider_error": "Google did not complete the sign-in. Please try again.",
    "oauth_provider_unavailable": "Google could not be reached. Please try again in a moment.",
    "invalid_id_token": "Google's answer could not be verified. Please try again.",
    "oauth_email_not_verified": "Your Google account's email address is not verified.",
    "oauth_not_configured": "Google sign-in is not available here.",
    "account_link_refused": "An account with this email exists but its email is not verified: "
    "sign in with your password and verify it first.",
    "throttled": "Too many attempts. Please wait a moment and try again.",
}


@router.get("/signin", response_class=HTMLResponse)
async def signin(
    request: Request,
    viewer: Viewer,
    next_path: NextParam = None,
    error: Annotated[str | None, Query(max_length=64)] = None,
) -> Response:
    target = safe_next(next_path)
    message = SIGNIN_ERRORS.get(error or "")
    return _page(
        request, "signin.html", viewer, private=False, next_path=target, error_message=message
    )


@router.get("/signin/second-factor", response_class=HTMLResponse)
async def signin_second_factor(
    request: Request, viewer: Viewer, next_path: NextParam = None
) -> Response:
    """The sign-in's second step (issue 15): the pending state is an HttpOnly cookie the page
    never sees; it posts the code to ``/api/auth/second-factor``."""
    target = safe_next(next_path)
    return _page(request, "second_factor.html", viewer, private=False, next_path=target)


@router.get("/signup", response_class=HTMLResponse)
async def signup(request: Request, viewer: Viewer, next_path: NextParam = None) -> Response:
    target = safe_next(next_path)
    return _page(request, "signup.html", viewer, private=False, next_path=target)


@router.get("/verify-email", response_class=HTMLResponse)
async def verify_email(request: Request, viewer: Viewer) -> Response:
    return _page(request, "verify_email.html", viewer, private=False)


@router.get("/forgot-password", response_class=HTMLResponse)
async def forgot_password(request: Request, viewer: Viewer) -> Response:
    return _page(request, "forgot_password.html", viewer, private=False)


@router.get("/reset-password", response_class=HTMLResponse)
async def reset_password(request: Request, viewer: Viewer) -> Response:
    return _page(request, "reset_password.html", viewer, private=False)


@router.get("/accept-invite", response_class=HTMLResponse)
async def accept_invite(request: Request, viewer: Viewer) -> Response:
    """The invitation link (``#token=…``): the invitee signs in and accepts (issue 12)."""
    return _page(request, "accept_invite.html", viewer, private=False)


# -- the cloud flow -----------------------------------------------------------------------------


@router.get("/cloud/new", response_class=HTMLResponse)
async def cloud_new(
    request: Request,
    viewer: Viewer,
    canceled: Annotated[str | None, Query(max_length=64)] = None,
) -> Response:
    """Step 1 (account) for visitors; steps 2-4 (plan, room, checkout) once signed in."""
    if viewer is None:
        return _page(request, "cloud_account.html", None, private=False, next_path="/cloud/new")
    canceled_id = canceled if canceled and _ID_RE.match(canceled) else None
    return _page(request, "cloud_new.html", viewer, private=True, canceled=canceled_id)


@router.get("/cloud/new/provisioning", response_class=HTMLResponse)
async def cloud_provisioning(
    request: Request,
    viewer: Viewer,
    instance: Annotated[str | None, Query(max_length=64)] = None,
    session_id: Annotated[str | None, Query(max_length=255)] = None,
) -> Response:
    if viewer is None:
        return _to_signin(request)
    if not instance or not _ID_RE.match(instance):
        return RedirectResponse("/app", status_code=303, headers={"Cache-Control": "no-store"})
    return _page(request, "provisioning.html", viewer, private=True, instance_id=instance)


# -- the person's instances ---------------------------------------------------------------------


@router.get("/app", response_class=HTMLResponse)
async def dashboard(request: Request, viewer: Viewer) -> Response:
    if viewer is None:
        return _to_signin(request)
    return _page(request, "dashboard.html", viewer, private=True)


@router.get("/app/security", response_class=HTMLResponse)
async def security(request: Request, viewer: Viewer) -> Response:
    """Two-step sign-in: set up an authenticator app, recovery codes, turn it off (issue 15)."""
    if viewer is None:
        return _to_signin(request)
    return _page(request, "security.html", viewer, private=True)


@router.get("/app/instances/{instance_id}/members", response_class=HTMLResponse)
async def members(request: Request, viewer: Viewer, instance_id: str) -> Response:
    if viewer is None:
        return _to_signin(request)
    if not _ID_RE.match(instance_id):
        return _page(request, "not_found.html", viewer, private=True, status_code=404)
    return _page(request, "members.html", viewer, private=True, instance_id=instance_id)


@router.get("/app/instances/{instance_id}/access", response_class=HTMLResponse)
async def access_log(request: Request, viewer: Viewer, instance_id: str) -> Response:
    """The Room's access log (issue 15): the owner's whole log, a member's own entries."""
    if viewer is None:
        return _to_signin(request)
    if not _ID_RE.match(instance_id):
        return _page(request, "not_found.html", viewer, private=True, status_code=404)
    return _page(request, "access_log.html", viewer, private=True, instance_id=instance_id)


@router.get("/app/instances/{instance_id}/open", response_class=HTMLResponse)
async def open_instance(request: Request, viewer: Viewer, instance_id: str) -> Response:
    """Asks for a runtime token and goes into the Room at the grant's ``launch_url``."""
    if viewer is None:
        return _to_signin(request)
    if not _ID_RE.match(instance_id):
        return _page(request, "not_found.html", viewer, private=True, status_code=404)
    return _page(request, "open.html", viewer, private=True, instance_id=instance_id)


# -- the installable app shell (issue 17) -------------------------------------------------------


@router.get(OFFLINE_PATH, response_class=HTMLResponse)
async def offline(request: Request) -> Response:
    """What the service worker shows for a page while the network is down. Rendered for nobody
    (the worker fetches it without cookies and stores it), so it holds no one's data."""
    return _page(request, "offline.html", None, private=False)


router.include_router(pwa_router)
