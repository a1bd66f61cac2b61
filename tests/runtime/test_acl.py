"""ACLGuard and Policy: instance binding, role policy, path normalisation, WebSockets."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient, WebSocketDenialResponse
from starlette.types import Receive, Scope, Send

from room_cloud_runtime._acl import (
    DEFAULT_POLICY,
    ACLGuard,
    BadPathError,
    Policy,
    Rule,
    normalize_path,
)
from room_cloud_runtime._errors import ConfigError
from room_cloud_runtime._scope import PRINCIPAL, Principal, state_of

INSTANCE = "inst_123"


def make_principal(role: str = "member", instance_id: str = INSTANCE) -> Principal:
    return Principal(
        subject=f"user-{role}",
        role=role,  # type: ignore[arg-type]
        instance_id=instance_id,
        session_id="sid",
        token_id="jti",
        expires_at=time.time() + 600,
    )


async def echo_app(scope: Scope, receive: Receive, send: Send) -> None:
    """The 'Room': answers 200 with what it saw; accepts WebSockets and says hello."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    if scope["type"] == "websocket":
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.send", "text": "hello"})
        await send({"type": "websocket.close", "code": 1000})
        return
    body = f'{{"method":"{scope["method"]}","path":"{scope["path"]}"}}'.encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})


class FakeAuth:
    """Stands in for the auth layer: the principal comes from test headers, never a token.

    ``x-test-role`` picks the role (absent = no principal), ``x-test-instance`` the instance.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            headers = dict(scope["headers"])
            role = headers.get(b"x-test-role")
            if role is not None:
                instance = headers.get(b"x-test-instance", INSTANCE.encode()).decode()
                state_of(scope)[PRINCIPAL] = make_principal(role.decode(), instance)
        await self.app(scope, receive, send)


def stack(policy: Policy = DEFAULT_POLICY, **kwargs: Any) -> FakeAuth:
    return FakeAuth(ACLGuard(echo_app, policy=policy, instance_id=INSTANCE, **kwargs))


@pytest.fixture
async def client() -> Any:
    transport = httpx.ASGITransport(app=stack())
    async with httpx.AsyncClient(transport=transport, base_url="http://room.test") as c:
        yield c


MEMBER = {"x-test-role": "member"}
OWNER = {"x-test-role": "owner"}

MEMBER_ALLOWED = [
    ("GET", "/api/status"),
    ("GET", "/api/rooms"),
    ("GET", "/api/rooms/1"),
    ("HEAD", "/api/rooms/1"),
    ("GET", "/api/rooms/1/messages"),
    ("GET", "/api/decisions/7"),
    ("GET", "/api/auth/verify"),
    ("POST", "/api/decisions/1/vote"),
    ("POST", "/api/decisions/1/keeper-vote"),
    ("POST", "/api/escalations/3/resolve"),
    ("POST", "/api/messages/4/reply"),
    ("POST", "/api/rooms/1/messages/9/read"),
]

MEMBER_REFUSED = [
    ("POST", "/api/rooms"),
    ("GET", "/api/credentials/x"),
    ("HEAD", "/api/credentials/x"),
    ("GET", "/api/credentials"),
    ("GET", "/api/rooms/1/credentials"),
    ("DELETE", "/api/rooms/1"),
    ("DELETE", "/api/credentials/1"),
    ("DELETE", "/api/decisions/1/vote"),
    ("PUT", "/api/settings/theme"),
    ("PATCH", "/api/rooms/1"),
    ("POST", "/api/rooms/1/queen/start"),
    ("POST", "/api/decisions/1/vote/extra"),
    ("POST", "/api/decisions/vote"),
    ("OPTIONS", "/api/rooms"),
]


@pytest.mark.parametrize(("method", "path"), MEMBER_ALLOWED)
async def test_a_member_may_call_every_route_the_policy_grants(
    client: httpx.AsyncClient, method: str, path: str
) -> None:
    response = await client.request(method, path, headers=MEMBER)
    assert response.status_code == 200


@pytest.mark.parametrize(("method", "path"), MEMBER_REFUSED)
async def test_a_member_is_refused_owner_only_routes_with_forbidden(
    client: httpx.AsyncClient, method: str, path: str
) -> None:
    response = await client.request(method, path, headers=MEMBER)
    assert response.status_code == 403
    if method != "HEAD":
        assert response.json() == {"error": "your role may not do this", "code": "forbidden"}


@pytest.mark.parametrize(("method", "path"), MEMBER_ALLOWED + MEMBER_REFUSED)
async def test_an_owner_may_call_everything_under_api(
    client: httpx.AsyncClient, method: str, path: str
) -> None:
    response = await client.request(method, path, headers=OWNER)
    assert response.status_code == 200


async def test_nobody_may_use_a_verb_no_rule_names_on_the_websocket_path(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post("/ws", headers=OWNER)
    assert response.status_code == 403
    assert response.json()["code"] == "forbidden"


@pytest.mark.parametrize(
    "path",
    [
        "/api/credentials/x/",
        "/API/credentials/x",
        "/api/CREDENTIALS/X",
        "/Api/Credentials",
        "/api/rooms/1/Credentials/",
    ],
)
async def test_trailing_slashes_and_case_do_not_hide_a_sensitive_path(
    client: httpx.AsyncClient, path: str
) -> None:
    response = await client.get(path, headers=MEMBER)
    assert response.status_code == 403
    assert response.json()["code"] == "forbidden"


@pytest.mark.parametrize(
    "path",
    [
        "/api//credentials/x",
        "/api/rooms/%2e%2e/credentials/x",
        "/api/rooms/%2E%2E/credentials/x",
        "/api/rooms%2f..%2fcredentials/x",
        "/api/rooms/%252e%252e/credentials/x",
        "/api/rooms/x%5c..%5ccredentials",
        "/api/rooms/1%00",
        "/api/rooms\\..\\credentials\\x",
    ],
)
async def test_look_alike_paths_are_refused_as_bad_path(
    client: httpx.AsyncClient, path: str
) -> None:
    response = await client.get(path, headers=OWNER)
    assert response.status_code == 400
    assert response.json() == {"error": "malformed request path", "code": "bad_path"}


async def call_raw(
    app: Any, path: str, raw_path: bytes | None = None, method: str = "GET"
) -> list[dict[str, Any]]:
    """Drive the ASGI app with a hand-built scope: httpx would normalise dot segments away."""
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "query_string": b"",
        "headers": [(b"x-test-role", b"member")],
        "client": ("127.0.0.1", 5000),
        "server": ("room.test", 80),
    }
    if raw_path is not None:
        scope["raw_path"] = raw_path
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


@pytest.mark.parametrize(
    "path",
    [
        "/api/rooms/../credentials/x",
        "/api/./credentials/x",
        "/api/rooms/..",
        "/assets/../api/credentials/x",
    ],
)
async def test_literal_dot_segments_are_refused_even_outside_protected_prefixes(path: str) -> None:
    sent = await call_raw(stack(), path, path.encode())
    assert sent[0]["status"] == 400
    assert b'"bad_path"' in sent[1]["body"]


async def test_an_encoded_dot_seen_only_in_raw_path_is_refused() -> None:
    # A server that hands over a decoded path that looks clean but a raw path with %2e: the
    # Room's URL parser would turn the raw one into "..".
    sent = await call_raw(stack(), "/api/rooms/x/credentials/1", b"/api/rooms/%2E%2E/credentials/1")
    assert sent[0]["status"] == 400


async def test_a_raw_path_carrying_a_query_string_is_judged_on_its_path_only() -> None:
    sent = await call_raw(stack(), "/api/rooms/1", b"/api/rooms/1?next=%2e%2e")
    assert sent[0]["status"] == 200


async def test_a_dot_inside_a_segment_is_not_a_dot_segment(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/rooms/v1.2..3", headers=MEMBER)
    assert response.status_code == 200


async def test_a_principal_for_another_instance_is_refused_with_wrong_instance(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get(
        "/api/rooms", headers={"x-test-role": "owner", "x-test-instance": "inst_other"}
    )
    assert response.status_code == 403
    assert response.json()["code"] == "wrong_instance"


async def test_a_request_without_a_principal_is_refused_with_unauthenticated(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/api/rooms")
    assert response.status_code == 401
    assert response.json() == {"error": "authentication required", "code": "unauthenticated"}
    assert response.headers["www-authenticate"].startswith("Bearer")


async def test_the_status_endpoint_is_public_for_reads_only(client: httpx.AsyncClient) -> None:
    assert (await client.get("/api/status")).status_code == 200
    # Only the exact spelling: Authenticate let a look-alike through without checking a token.
    assert (await client.get("/API/Status/")).status_code == 401
    assert (await client.post("/api/status")).status_code == 401


async def test_an_unknown_role_is_refused_even_on_member_routes(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/api/rooms", headers={"x-test-role": "admin"})
    assert response.status_code == 403
    assert response.json()["code"] == "forbidden"


@pytest.mark.parametrize("path", ["/", "/assets/app.js", "/wsx", "/apix", "/health"])
async def test_paths_outside_the_protected_prefixes_pass_without_a_principal(
    client: httpx.AsyncClient, path: str
) -> None:
    response = await client.get(path)
    assert response.status_code == 200


async def test_a_lower_case_verb_is_not_mistaken_for_get() -> None:
    # Only "*" rules apply to a verb no rule names; for members there are none.
    sent = await call_raw(stack(), "/api/rooms", b"/api/rooms", method="get")
    assert sent[0]["status"] == 403


# -- the verdict memo --------------------------------------------------------------------------


async def test_a_memoised_verdict_still_checks_who_asks_on_every_request(
    client: httpx.AsyncClient,
) -> None:
    path = "/api/credentials/c1"
    assert (await client.get(path, headers=OWNER)).status_code == 200
    assert (await client.get(path, headers=MEMBER)).status_code == 403
    assert (await client.get(path)).status_code == 401
    other = {"x-test-role": "owner", "x-test-instance": "inst_other"}
    assert (await client.get(path, headers=other)).status_code == 403
    assert (await client.get(path, headers=OWNER)).status_code == 200


async def test_the_memo_tells_requests_apart_by_method_and_raw_path() -> None:
    app = stack()
    assert (await call_raw(app, "/api/rooms/x", b"/api/rooms/x"))[0]["status"] == 200
    # Same decoded path, different raw path: judged again, not answered from the memo.
    assert (await call_raw(app, "/api/rooms/x", b"/api/rooms/%2e%2e"))[0]["status"] == 400
    assert (await call_raw(app, "/api/rooms/x", None))[0]["status"] == 200
    assert (await call_raw(app, "/api/rooms/x", b"/api/rooms/x", method="DELETE"))[0][
        "status"
    ] == 403


async def test_the_memo_is_bounded_in_entries_and_in_key_length() -> None:
    from room_cloud_runtime import _acl

    guard = ACLGuard(echo_app, instance_id=INSTANCE)
    app = FakeAuth(guard)
    for i in range(_acl._MEMO_SIZE + 10):
        path = f"/api/rooms/{i}"
        assert (await call_raw(app, path, path.encode()))[0]["status"] == 200
    assert 0 < len(guard._memo) <= _acl._MEMO_SIZE
    guard._memo.clear()
    long = "/api/rooms/" + "x" * _acl._MEMO_MAX_PATH
    assert (await call_raw(app, long, long.encode()))[0]["status"] == 200
    assert (await call_raw(app, long, long.encode(), method="DELETE"))[0]["status"] == 403
    assert guard._memo == {}


def test_a_member_may_open_the_websocket() -> None:
    with (
        TestClient(stack()) as tc,
        tc.websocket_connect("/ws", headers=MEMBER) as ws,
    ):
        assert ws.receive_text() == "hello"


def test_a_websocket_without_a_principal_is_refused_before_accept() -> None:
    with TestClient(stack()) as tc, pytest.raises(WebSocketDenialResponse) as info:
        with tc.websocket_connect("/ws"):
            pass
    assert info.value.status_code == 401
    assert info.value.json()["code"] == "unauthenticated"


def test_a_websocket_for_another_instance_is_refused_before_accept() -> None:
    headers = {"x-test-role": "member", "x-test-instance": "elsewhere"}
    with TestClient(stack()) as tc, pytest.raises(WebSocketDenialResponse) as info:
        with tc.websocket_connect("/ws", headers=headers):
            pass
    assert info.value.status_code == 403
    assert info.value.json()["code"] == "wrong_instance"


def test_a_websocket_the_policy_does_not_allow_is_refused_with_forbidden() -> None:
    policy = Policy([Rule("GET", "/ws", "owner")])
    with TestClient(stack(policy)) as tc, pytest.raises(WebSocketDenialResponse) as info:
        with tc.websocket_connect("/ws", headers=MEMBER):
            pass
    assert info.value.status_code == 403
    assert info.value.json()["code"] == "forbidden"


async def test_a_websocket_refusal_without_the_denial_extension_closes_with_1008() -> None:
    sent: list[dict[str, Any]] = []

    async def receive() -> Any:
        return {"type": "websocket.connect"}

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {"type": "websocket", "path": "/ws", "raw_path": b"/ws", "headers": []}
    await stack()(scope, receive, send)
    assert sent == [{"type": "websocket.close", "code": 1008, "reason": "unauthenticated"}]


async def test_lifespan_passes_through_untouched() -> None:
    seen: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])

    guard = ACLGuard(app, instance_id=INSTANCE)
    await guard({"type": "lifespan"}, None, None)  # type: ignore[arg-type]
    assert seen == ["lifespan"]


async def test_a_custom_policy_replaces_the_default() -> None:
    policy = Policy(
        [
            Rule("GET", "/api/rooms/**", "member"),
            Rule("POST", "/api/rooms/{id}/chat", "member"),
            Rule("*", "/api/**", "owner"),
        ]
    )
    transport = httpx.ASGITransport(app=stack(policy))
    async with httpx.AsyncClient(transport=transport, base_url="http://room.test") as c:
        assert (await c.post("/api/rooms/1/chat", headers=MEMBER)).status_code == 200
        assert (await c.get("/api/rooms/1", headers=MEMBER)).status_code == 200
        # The default's member reads are gone: only what this policy says holds.
        assert (await c.get("/api/decisions/1", headers=MEMBER)).status_code == 403
        assert (await c.post("/api/decisions/1/vote", headers=MEMBER)).status_code == 403
        assert (await c.get("/ws", headers=MEMBER)).status_code == 403


async def test_custom_protected_prefixes_and_public_paths_are_honoured() -> None:
    app = stack(protected_prefixes=("/rpc/",), public_paths=())
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://room.test") as c:
        assert (await c.get("/api/credentials/1")).status_code == 200  # no longer protected
        assert (await c.get("/RPC/anything")).status_code == 401


# --- Policy: precedence and compilation -----------------------------------------------------


def test_an_exact_rule_beats_a_pattern_with_more_literal_segments() -> None:
    policy = Policy(
        [
            Rule("GET", "/api/rooms/special", "member"),
            Rule("GET", "/api/{kind}/{id}", "owner"),
            Rule("GET", "/api/rooms/**", "owner"),
        ]
    )
    assert policy.least_role("GET", "/api/rooms/special") == "member"
    assert policy.least_role("GET", "/api/rooms/other") == "owner"


def test_more_literal_segments_beat_fewer() -> None:
    policy = Policy(
        [
            Rule("GET", "/api/{a}/{b}/vote", "owner"),
            Rule("GET", "/api/decisions/{id}/vote", "member"),
        ]
    )
    assert policy.least_role("GET", "/api/decisions/1/vote") == "member"
    assert policy.least_role("GET", "/api/other/1/vote") == "owner"


def test_a_pattern_without_a_globstar_beats_one_with_it_at_equal_literals() -> None:
    policy = Policy(
        [Rule("GET", "/api/rooms/**", "owner"), Rule("GET", "/api/rooms/{id}", "member")]
    )
    assert policy.least_role("GET", "/api/rooms/1") == "member"
    assert policy.least_role("GET", "/api/rooms/1/x") == "owner"
    assert policy.least_role("GET", "/api/rooms") == "owner"  # ** matches zero segments


def test_a_rule_naming_the_method_beats_a_star_rule_for_the_same_pattern() -> None:
    policy = Policy([Rule("*", "/api/**", "owner"), Rule("POST", "/api/**", "member")])
    assert policy.least_role("POST", "/api/x") == "member"
    assert policy.least_role("PUT", "/api/x") == "owner"


def test_path_specificity_beats_method_specificity() -> None:
    policy = Policy([Rule("GET", "/api/**", "member"), Rule("*", "/api/credentials/{id}", "owner")])
    assert policy.least_role("GET", "/api/credentials/1") == "owner"


def test_a_get_rule_covers_head_unless_a_head_rule_says_otherwise() -> None:
    policy = Policy(
        [
            Rule("GET", "/api/**", "member"),
            Rule("GET", "/api/rooms", "member"),
            Rule("HEAD", "/api/rooms", "owner"),
        ]
    )
    assert policy.least_role("HEAD", "/api/decisions") == "member"
    assert policy.least_role("HEAD", "/api/rooms") == "owner"


def test_an_equally_specific_tie_goes_to_the_stricter_rule() -> None:
    policy = Policy([Rule("GET", "/api/{a}/x", "member"), Rule("GET", "/api/x/{b}", "owner")])
    assert policy.least_role("GET", "/api/x/x") == "owner"


def test_a_rule_with_role_none_carves_out_a_denial() -> None:
    policy = Policy([Rule("*", "/api/**", "owner"), Rule("DELETE", "/api/**", None)])
    assert policy.least_role("DELETE", "/api/rooms/1") is None
    assert policy.least_role("POST", "/api/rooms") == "owner"


def test_a_request_no_rule_matches_follows_the_default() -> None:
    assert Policy([]).least_role("GET", "/api/x") is None
    assert Policy([], default="owner").least_role("GET", "/api/x") == "owner"


def test_the_default_policy_matches_the_room_api() -> None:
    p = DEFAULT_POLICY
    assert p.least_role("GET", "/api/rooms/1") == "member"
    assert p.least_role("GET", "/api/credentials/1") == "owner"
    assert p.least_role("GET", "/api/credentials") == "owner"
    assert p.least_role("GET", "/api/rooms/1/credentials") == "owner"
    assert p.least_role("POST", "/api/rooms/1/messages/2/read") == "member"
    assert p.least_role("POST", "/api/rooms") == "owner"
    assert p.least_role("GET", "/ws") == "member"
    assert p.least_role("GET", "/elsewhere") is None


def test_least_role_refuses_a_path_that_fails_normalisation() -> None:
    with pytest.raises(BadPathError):
        DEFAULT_POLICY.least_role("GET", "/api/rooms/../credentials/1")


def test_normalize_path_lowercases_ascii_only_and_drops_one_trailing_slash() -> None:
    assert normalize_path("/API/Rooms/") == "/api/rooms"
    assert normalize_path("/") == "/"
    # The Kelvin sign is not "k" to the Room's matcher, so it is not here either.
    assert normalize_path("/api/\u212a") == "/api/\u212a"


@pytest.mark.parametrize(
    ("rule", "fragment"),
    [
        (Rule("FETCH", "/api/x", "owner"), "method"),
        (Rule("GET", "api/x", "owner"), "start with '/'"),
        (Rule("GET", "/api/x/", "owner"), "end with '/'"),
        (Rule("GET", "/api//x", "owner"), "segment ''"),
        (Rule("GET", "/api/**/x", "owner"), "last segment"),
        (Rule("GET", "/api/../x", "owner"), "segment '..'"),
        (Rule("GET", "/api/x{id}", "owner"), "segment 'x{id}'"),
        (Rule("GET", "/api/*", "owner"), "segment '*'"),
        (Rule("GET", "/api/{id}/{id}", "owner"), "twice"),
        (Rule("GET", "/api/x", "admin"), "role"),  # type: ignore[arg-type]
    ],
)
def test_a_malformed_rule_raises_config_error_naming_the_rule(rule: Rule, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        Policy([Rule("GET", "/api/ok", "member"), rule])
    assert "policy rule #1" in info.value.setting
    assert repr(rule) in info.value.setting
    assert fragment in info.value.message


def test_a_duplicate_rule_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="duplicates"):
        Policy([Rule("GET", "/api/{id}", "member"), Rule("get", "/api/{other}", "owner")])


def test_something_that_is_not_a_rule_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="not a Rule"):
        Policy([("GET", "/api/x", "owner")])  # type: ignore[list-item]


def test_a_bad_default_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"policy\.default"):
        Policy([], default="admin")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "setting"),
    [
        ({"instance_id": ""}, "instance_id"),
        ({"instance_id": INSTANCE, "protected_prefixes": "/api/"}, "protected_prefixes"),
        ({"instance_id": INSTANCE, "protected_prefixes": ("/",)}, "protected_prefixes"),
        ({"instance_id": INSTANCE, "public_paths": ("/api//x",)}, "public_paths"),
        ({"instance_id": INSTANCE, "policy": [Rule("GET", "/x", "owner")]}, "policy"),
    ],
)
def test_bad_guard_options_raise_config_error_naming_the_option(
    kwargs: dict[str, Any], setting: str
) -> None:
    with pytest.raises(ConfigError) as info:
        ACLGuard(echo_app, **kwargs)
    assert info.value.setting == setting


async def test_the_guard_costs_about_a_microsecond_per_request() -> None:
    """Not a benchmark (bench/ has those): a guard against an accidental O(rules) slowdown."""

    async def noop(scope: Scope, receive: Receive, send: Send) -> None:
        return None

    guard = ACLGuard(noop, instance_id=INSTANCE)
    scope: dict[str, Any] = {
        "type": "http",
        "method": "POST",
        "path": "/api/decisions/123/vote",
        "raw_path": b"/api/decisions/123/vote",
        "state": {PRINCIPAL: make_principal("member")},
    }
    n = 20_000
    started = time.perf_counter()
    for _ in range(n):
        await noop(scope, None, None)  # type: ignore[arg-type]
    baseline = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(n):
        await guard(scope, None, None)  # type: ignore[arg-type]
    per_request_us = (time.perf_counter() - started - baseline) / n * 1e6
    assert per_request_us < 20  # generous: CI machines are slow and shared


async def test_the_guard_in_front_of_the_reference_room_enforces_the_default_policy() -> None:
    from room_cloud_runtime.reference import create_room_app

    app = FakeAuth(ACLGuard(create_room_app(), instance_id=INSTANCE))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://room.test") as c:
        vote = await c.post("/api/decisions/d1/vote", headers=MEMBER, json={"vote": "yes"})
        assert vote.status_code == 200
        assert vote.json()["votes"] == {"user-member": "yes"}
        assert (await c.get("/api/credentials/c1", headers=MEMBER)).status_code == 403
        assert (await c.get("/api/credentials/c1", headers=OWNER)).status_code == 200
        assert (await c.post("/api/rooms", headers=MEMBER, json={"name": "x"})).status_code == 403
        assert (await c.post("/api/rooms", headers=OWNER, json={"name": "x"})).status_code == 201


# --- issue 12, item 3: only the exact public path skips the principal check ----------------------


@pytest.mark.parametrize("path", ["/API/STATUS", "/Api/Status", "/api/STATUS", "/api/status/"])
async def test_case_variants_of_the_public_status_path_need_a_principal(path: str) -> None:
    seen: list[str] = []

    async def app(scope, receive, send):
        seen.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    guard = ACLGuard(app, instance_id="inst-1")
    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b""}

    scope = {
        "type": "http",
        "method": "GET",
        "path": path,
        "raw_path": path.encode(),
        "headers": [],
    }
    await guard(scope, receive, send)
    assert sent[0]["status"] == 401 and seen == []
    await guard({**scope, "path": "/api/status", "raw_path": b"/api/status"}, receive, send)
    assert seen == ["/api/status"]


@pytest.mark.parametrize(
    "path", ["/api/rooms;x=1", "/api/credentials;/1", "/ws;", "/index.html;jsessionid=1"]
)
def test_a_semicolon_in_a_path_is_refused(path: str) -> None:
    with pytest.raises(BadPathError):
        normalize_path(path)
