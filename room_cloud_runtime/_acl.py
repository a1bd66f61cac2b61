"""The ACL layer: instance binding plus a role policy by method and path, deny by default.

The policy is data: a list of :class:`Rule` (method + path pattern -> least role) compiled once
by :class:`Policy` into an exact-path dict and one alternation regex per method, so the request
path costs a dict lookup and, at most, one regex match.

Pattern syntax (matched case-insensitively, see :func:`normalize_path`):

- literal segments: ``/api/rooms``
- ``{name}``: exactly one non-empty segment: ``/api/decisions/{id}/vote``
- ``**`` as the last segment: zero or more further segments: ``/api/**`` matches ``/api``,
  ``/api/rooms`` and ``/api/rooms/1/messages``

Precedence, when several rules match a request (the first difference decides):

1. an exact rule (no ``{param}``, no ``**``) beats every pattern rule;
2. more literal segments beat fewer (``/api/credentials/**`` beats ``/api/**``);
3. a rule without ``**`` beats one with it;
4. more segments beat fewer;
5. a rule naming the method beats a ``GET`` rule applied to ``HEAD``, which beats ``"*"``;
6. on a remaining tie the stricter rule wins (deny > owner > member), so an ambiguous policy
   fails closed.

Paths are checked before matching: dot segments, empty segments (``//``), backslashes, control
characters and percent-encoded ``/ . \\ %`` or NUL are refused with 400 ``bad_path``. A server
or proxy that normalises such paths (the WHATWG URL parser the Room uses turns ``%2e%2e`` into
``..`` and ``\\`` into ``/``) would otherwise route a look-alike path to a handler other than the
one the policy judged -- the classic ACL bypass (e.g. CVE-2021-41773, CVE-2023-50164).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from starlette.types import ASGIApp, Receive, Scope, Send

from ._errors import CloudRuntimeError, ConfigError
from ._responses import deny_websocket, send_error
from ._scope import ROLE_RANK, ROLES, Role, principal_of

__all__ = [
    "DEFAULT_POLICY",
    "ACLGuard",
    "BadPathError",
    "Policy",
    "Rule",
    "normalize_path",
]

# Verbs a rule may name. WebSocket upgrades are judged as GET (RFC 6455 section 4.1).
HTTP_METHODS: Final = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}
)
# A rank no principal has: "nobody may".
_NOBODY: Final = 1 << 30
_RANK_TO_ROLE: Final[dict[int, Role]] = {ROLE_RANK[role]: role for role in ROLES}
# ACLGuard's memo of verdicts by (method, path, raw_path): bounded in entries and in key length,
# because the keys come from the client. Past the cap it is cleared and refilled.
_MEMO_SIZE: Final = 4096
_MEMO_MAX_PATH: Final = 512
# Verdicts: (least rank, readable without a principal) for a protected path, or one of these
# two sentinels, compared by identity.
_Verdict = tuple[int, bool]
_BAD_PATH: Final[_Verdict] = (-1, False)
_UNPROTECTED: Final[_Verdict] = (-2, False)

# A dot segment ("." or ".."), and a percent sequence that decodes to a separator, a dot, NUL
# or another escape (double encoding). Both are searched only after a cheap substring test.
_DOT_SEGMENT = re.compile(r"/\.{1,2}(?:/|$)")
_ENCODED = re.compile(r"%(?:2[ef5]|5c|00)", re.IGNORECASE)
_ENCODED_RAW = re.compile(rb"%(?:2[ef5]|5c|00)", re.IGNORECASE)
_LITERAL_SEGMENT = re.compile(r"[A-Za-z0-9\-._~!$&'()+,;=:@]+")
_PARAM_SEGMENT = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*\}")
# Lower-case ASCII only: the Room's matching never folds non-ASCII, and Python's full Unicode
# folding would make e.g. the Kelvin sign equal "k" here but not there.
_ASCII_LOWER: Final = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


class BadPathError(CloudRuntimeError):
    """A request path the ACL refuses to judge (400 ``bad_path``). ``reason`` says why."""

    status = 400
    code = "bad_path"

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def normalize_path(path: str, raw_path: bytes | None = None) -> str:
    """Return the canonical form the policy matches, or raise :class:`BadPathError`.

    ``path`` is ASGI's percent-decoded ``scope["path"]``; ``raw_path`` (optional) is the bytes
    as received. Both are checked because each hides what the other shows: ``%2e%2e`` is only
    visible raw, ``%252e`` (double encoding) only decoded. The result is ASCII-lower-cased
    (the policy is case-insensitive, so ``/API/Credentials/1`` is judged like the real thing)
    with one trailing slash removed (routers commonly treat ``/x/`` as ``/x``).
    """
    if not path.startswith("/"):
        raise BadPathError("path must start with '/'")
    # isprintable() is False for NUL and every other control character (and for invisible
    # Unicode format characters, which no Room path needs either).
    if ";" in path:
        # Matrix parameters: some routers cut the path at ";", so "/api/x;/y" could be judged
        # as one path and served as another. No Room path has one.
        raise BadPathError("path has ';'")
    if "//" in path or "\\" in path or not path.isprintable():
        raise BadPathError("path has empty segments, backslashes or control characters")
    if "/." in path and _DOT_SEGMENT.search(path):
        raise BadPathError("path has '.' or '..' segments")
    if "%" in path and _ENCODED.search(path):
        raise BadPathError("path has double-encoded characters")
    # Servers differ on whether raw_path carries the query string; it never matters here.
    if raw_path is not None and b"%" in raw_path and _ENCODED_RAW.search(raw_path.split(b"?")[0]):
        raise BadPathError("path has percent-encoded separators or dots")
    lowered = path.lower() if path.isascii() else path.translate(_ASCII_LOWER)
    if len(lowered) > 1 and lowered[-1] == "/":
        lowered = lowered[:-1]
    return lowered


@dataclass(frozen=True, slots=True)
class Rule:
    """``method`` (an HTTP verb or ``"*"``) on ``pattern`` needs at least ``role``.

    ``role=None`` denies everyone: use it to carve an exception out of a broader rule. A
    ``GET`` rule also covers ``HEAD`` unless a ``HEAD`` rule for the same pattern exists.
    """

    method: str
    pattern: str
    role: Role | None


@dataclass(frozen=True, slots=True)
class _Compiled:
    method: str  # an upper-case verb or "*"
    exact: str | None
    regex: str
    literals: int
    globstar: bool
    segments: int
    rank: int
    source: str

    def key(self, method_spec: int) -> tuple[int, ...]:
        # Larger sorts first; see the module docstring for the precedence this encodes.
        # method_spec: 2 the rule names the verb, 1 a GET rule applied to HEAD, 0 "*".
        return (
            self.exact is not None,
            self.literals,
            not self.globstar,
            self.segments,
            method_spec,
            self.rank,
        )


class _Table:
    """The compiled rules that apply to one method."""

    __slots__ = ("exact", "ranks", "regex")

    def __init__(self, entries: list[tuple[_Compiled, int]]) -> None:
        ordered = sorted(entries, key=lambda e: e[0].key(e[1]), reverse=True)
        self.exact: dict[str, int] = {}
        patterns: list[str] = []
        ranks: list[int] = [0]  # group numbers start at 1
        seen: set[str] = set()
        for rule, _spec in ordered:
            if rule.exact is not None:
                # First seen is the most specific (sorted above); later ones are shadowed.
                self.exact.setdefault(rule.exact, rule.rank)
            elif rule.regex not in seen:
                # An identical pattern later in the order can never win: leave it out.
                seen.add(rule.regex)
                patterns.append(f"({rule.regex})")
                ranks.append(rule.rank)
        # One alternation per method: re tries alternatives left to right, and they are in
        # precedence order, so the first that fully matches is the winning rule.
        self.regex = re.compile("|".join(patterns)) if patterns else None
        self.ranks = tuple(ranks)

    def lookup(self, path: str) -> int | None:
        rank = self.exact.get(path)
        if rank is not None:
            return rank
        if self.regex is not None:
            match = self.regex.fullmatch(path)
            if match is not None:
                return self.ranks[match.lastindex or 0]
        return None


class Policy:
    """A compiled, immutable ACL policy: who may call which method on which path.

    ``default`` is the least role for a request no rule matches: ``"deny"`` (nobody, the
    default) or a role name. Malformed rules raise :class:`ConfigError` naming the rule.
    """

    __slots__ = ("_default", "_fallback", "_tables", "default", "rules")

    def __init__(self, rules: Iterable[Rule], *, default: Literal["deny"] | Role = "deny") -> None:
        self.rules: tuple[Rule, ...] = tuple(rules)
        if default != "deny" and default not in ROLE_RANK:
            raise ConfigError("policy.default", f"must be 'deny' or a role, got {default!r}")
        self.default = default
        self._default = _NOBODY if default == "deny" else ROLE_RANK[default]
        compiled = [_compile(i, rule) for i, rule in enumerate(self.rules)]
        _refuse_duplicates(compiled)
        named = sorted({c.method for c in compiled if c.method != "*"} | {"HEAD"})
        self._tables: dict[str, _Table] = {m: _Table(_entries_for(m, compiled)) for m in named}
        # Verbs no rule names (including unknown and lower-case ones) see only "*" rules.
        self._fallback = _Table(_entries_for("", compiled))

    def least_role(self, method: str, path: str) -> Role | None:
        """The least role that may call ``method`` on ``path``; ``None`` means nobody.

        ``path`` is normalised first; a path :func:`normalize_path` refuses raises
        :class:`BadPathError`.
        """
        rank = self.least_rank(method, normalize_path(path))
        return _RANK_TO_ROLE.get(rank)

    def least_rank(self, method: str, normalized_path: str) -> int:
        """Hot-path lookup on an already normalised path: a ``ROLE_RANK`` value, or a rank
        higher than any role's when nobody may."""
        table = self._tables.get(method, self._fallback)
        rank = table.lookup(normalized_path)
        return self._default if rank is None else rank

    def __repr__(self) -> str:
        return f"Policy({len(self.rules)} rules, default={self.default!r})"


def _entries_for(method: str, compiled: Sequence[_Compiled]) -> list[tuple[_Compiled, int]]:
    entries: list[tuple[_Compiled, int]] = []
    for rule in compiled:
        if method and rule.method == method:
            entries.append((rule, 2))
        elif method == "HEAD" and rule.method == "GET":
            entries.append((rule, 1))
        elif rule.method == "*":
            entries.append((rule, 0))
    return entries


def _compile(index: int, rule: object) -> _Compiled:
    source = f"policy rule #{index} {rule!r}"

    def bad(message: str) -> ConfigError:
        return ConfigError(source, message)

    if not isinstance(rule, Rule):
        raise bad("is not a Rule")
    if not isinstance(rule.method, str) or not isinstance(rule.pattern, str):
        raise bad("method and pattern must be strings")
    method = rule.method.strip().upper()
    if method != "*" and method not in HTTP_METHODS:
        raise bad(f"method must be '*' or one of {sorted(HTTP_METHODS)}")
    if rule.role is not None and rule.role not in ROLE_RANK:
        raise bad(f"role must be one of {sorted(ROLE_RANK)} or None")
    pattern = rule.pattern
    if not pattern.startswith("/"):
        raise bad("pattern must start with '/'")
    if pattern != "/" and pattern.endswith("/"):
        raise bad("pattern must not end with '/' (a trailing slash is ignored when matching)")
    segments = pattern.split("/")[1:] if pattern != "/" else []
    parts: list[str] = []
    literals = 0
    globstar = False
    names: set[str] = set()
    for position, segment in enumerate(segments):
        if segment == "**":
            if position != len(segments) - 1:
                raise bad("'**' is only allowed as the last segment")
            globstar = True
            parts.append("(?:/.*)?")
        elif _PARAM_SEGMENT.fullmatch(segment):
            if segment in names:
                raise bad(f"parameter {segment} appears twice")
            names.add(segment)
            parts.append("/[^/]+")
        elif segment in (".", "..") or not _LITERAL_SEGMENT.fullmatch(segment):
            raise bad(f"segment {segment!r} is not a literal, a {{param}} or a final '**'")
        else:
            literals += 1
            parts.append("/" + re.escape(segment.translate(_ASCII_LOWER)))
    exact = None
    if not names and not globstar:
        exact = "/" + "/".join(s.translate(_ASCII_LOWER) for s in segments)
    return _Compiled(
        method=method,
        exact=exact,
        regex="".join(parts) or "/",
        literals=literals,
        globstar=globstar,
        segments=len(segments) - int(globstar),
        rank=_NOBODY if rule.role is None else ROLE_RANK[rule.role],
        source=source,
    )


def _refuse_duplicates(compiled: Sequence[_Compiled]) -> None:
    seen: dict[tuple[str, str], str] = {}
    for rule in compiled:
        # Patterns that differ only in parameter names are the same pattern.
        key = (rule.method, rule.regex)
        if key in seen:
            raise ConfigError(rule.source, f"duplicates {seen[key]}")
        seen[key] = rule.source


# The Room's API (quoroom-ai/room src/server/access.ts, MEMBER_ROLE_WRITE_WHITELIST and
# AUTO_MODE_USER_GET_DENYLIST) expressed as data.
DEFAULT_POLICY: Final = Policy(
    [
        # The owner may do everything under /api/.
        Rule("*", "/api/**", "owner"),
        # Members read everything ...
        Rule("GET", "/api/**", "member"),
        # ... except credentials: a credential record, the (future) flat listing and the
        # per-room listing. The Room masks values, but names, providers and which rooms hold
        # which keys are still the owner's business.
        Rule("GET", "/api/credentials/**", "owner"),
        Rule("GET", "/api/rooms/{room_id}/credentials/**", "owner"),
        # Collaboration writes.
        Rule("POST", "/api/decisions/{id}/vote", "member"),
        Rule("POST", "/api/decisions/{id}/keeper-vote", "member"),
        Rule("POST", "/api/escalations/{id}/resolve", "member"),
        Rule("POST", "/api/messages/{id}/reply", "member"),
        Rule("POST", "/api/rooms/{room_id}/messages/{id}/read", "member"),
        # Live events. The upgrade is a GET; nothing else is served on /ws.
        Rule("GET", "/ws", "member"),
    ]
)


class ACLGuard:
    """Pure ASGI middleware: instance binding + role policy for protected paths.

    For ``http`` and ``websocket`` scopes whose path is under ``protected_prefixes`` it reads
    the :class:`~room_cloud_runtime._scope.Principal` the auth layer stored and answers:

    - 400 ``bad_path`` for a path :func:`normalize_path` refuses (on every path, protected or
      not, because a look-alike is how a protected path would pass as an unprotected one);
    - 401 ``unauthenticated`` when there is no principal (defence in depth: auth normally
      answered already);
    - 403 ``wrong_instance`` when the principal was issued for another instance;
    - 403 ``forbidden`` when no rule allows the principal's role.

    ``public_paths`` are exact paths (as spelled: ``/API/STATUS`` is not public) that
    ``GET``/``HEAD`` may read without a principal, so the UI can learn the deployment mode;
    everything else is denied by default.
    WebSocket refusals are sent before accept. ``lifespan`` passes through.

    The policy's verdict for a (method, path, raw path) is memoised in a bounded dict (the policy
    never changes after construction), so a repeated request costs one dict lookup plus the
    principal checks, which are never memoised.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        policy: Policy = DEFAULT_POLICY,
        instance_id: str,
        protected_prefixes: Sequence[str] = ("/api/", "/ws"),
        public_paths: Iterable[str] = ("/api/status",),
    ) -> None:
        if not isinstance(policy, Policy):
            raise ConfigError("policy", "must be a Policy")
        if not isinstance(instance_id, str) or not instance_id.strip():
            raise ConfigError("instance_id", "must be a non-empty string")
        if isinstance(protected_prefixes, str) or not protected_prefixes:
            raise ConfigError("protected_prefixes", "must be a non-empty sequence of paths")
        bases: list[str] = []
        for prefix in protected_prefixes:
            if not isinstance(prefix, str) or not prefix.startswith("/") or prefix == "/":
                raise ConfigError("protected_prefixes", f"bad prefix {prefix!r}")
            bases.append(prefix.rstrip("/").translate(_ASCII_LOWER))
        self.app = app
        self.policy = policy
        self.instance_id = instance_id
        # "/ws" protects "/ws" and "/ws/..." but not "/wsx": a prefix is a path, not a string.
        self._exact_protected = frozenset(bases)
        self._protected_starts = tuple(base + "/" for base in bases)
        public_paths = tuple(public_paths)
        public: set[str] = set()
        for path in public_paths:
            try:
                public.add(normalize_path(path))
            except BadPathError as exc:
                raise ConfigError("public_paths", f"{path!r}: {exc.reason}") from exc
        self._public = frozenset(public)
        # Only the exact configured spelling skips the principal check: Authenticate matches
        # paths case-sensitively, so ``/API/STATUS`` reached here without a token verified.
        self._public_exact = frozenset(public_paths)
        # The only state that changes after construction: a bounded memo of verdicts.
        self._memo: dict[tuple[str, str, bytes | None], _Verdict] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            method = scope.get("method", "GET")
        elif kind == "websocket":
            method = "GET"  # the upgrade is a GET (RFC 6455 section 4.1)
        else:
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        raw_path = scope.get("raw_path")
        # The verdict depends only on (method, path, raw_path) and the immutable policy, so it
        # is memoised; who asks (the principal) is checked below on every request.
        key = (method, path, raw_path)
        verdict = self._memo.get(key)
        if verdict is None:
            verdict = self._judge(method, path, raw_path)
            if len(path) <= _MEMO_MAX_PATH and (
                raw_path is None or len(raw_path) <= _MEMO_MAX_PATH
            ):
                memo = self._memo
                if len(memo) >= _MEMO_SIZE:
                    # Keys are attacker-controlled: a hard cap, and clearing is O(1) amortised.
                    memo.clear()
                memo[key] = verdict
        if verdict is _UNPROTECTED:
            await self.app(scope, receive, send)
            return
        if verdict is _BAD_PATH:
            await self._refuse(scope, send, 400, "malformed request path", "bad_path")
            return
        least_rank, public = verdict
        principal = principal_of(scope)
        if principal is None:
            if public and (method == "GET" or method == "HEAD"):
                await self.app(scope, receive, send)
                return
            await self._refuse(
                scope,
                send,
                401,
                "authentication required",
                "unauthenticated",
                [(b"www-authenticate", b'Bearer realm="quoroom-runtime"')],
            )
            return
        if principal.instance_id != self.instance_id:
            await self._refuse(
                scope, send, 403, "token was issued for another instance", "wrong_instance"
            )
            return
        # An unknown role gets rank 0, below every rule: fail closed even if a verifier let
        # one through.
        if ROLE_RANK.get(principal.role, 0) < least_rank:
            await self._refuse(scope, send, 403, "your role may not do this", "forbidden")
            return
        await self.app(scope, receive, send)

    def _judge(self, method: str, path: str, raw_path: bytes | None) -> _Verdict:
        """What the policy says about a request, before looking at who sends it.

        :data:`_BAD_PATH`, :data:`_UNPROTECTED`, or ``(least_rank, public)`` for a protected
        path (``public``: readable without a principal).
        """
        try:
            normalized = normalize_path(path, raw_path)
        except BadPathError:
            return _BAD_PATH
        if normalized not in self._exact_protected and not normalized.startswith(
            self._protected_starts
        ):
            return _UNPROTECTED
        return self.policy.least_rank(method, normalized), path in self._public_exact

    @staticmethod
    async def _refuse(
        scope: Scope,
        send: Send,
        status: int,
        message: str,
        code: str,
        headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        if scope["type"] == "websocket":
            await deny_websocket(scope, send, status, message, code, headers)
        else:
            await send_error(send, status, message, code, headers)
