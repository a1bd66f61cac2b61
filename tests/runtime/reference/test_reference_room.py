"""The reference Room: routes, validation, local handshake and token, trust of an outer
principal, persistence, and live events over the WebSocket."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient, WebSocketDenialResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from room_cloud_runtime._errors import ConfigError
from room_cloud_runtime._scope import PRINCIPAL, Principal, state_of
from room_cloud_runtime.reference import SNAPSHOT_NAME, create_room_app

TOKEN = "test-local-token-0123456789"
AUTH = {"authorization": f"Bearer {TOKEN}"}


def client_for(
    app: ASGIApp, *, client: tuple[str, int] = ("127.0.0.1", 50000), base_url: str = ""
) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=client)
    return httpx.AsyncClient(transport=transport, base_url=base_url or "http://127.0.0.1:3700")


@pytest.fixture
async def room() -> Any:
    async with client_for(create_room_app(local_token=TOKEN)) as c:
        yield c


class WithPrincipal:
    """Stands in for the cloud stack: authenticated and authorised, principal in the scope."""

    def __init__(self, app: ASGIApp, subject: str = "user-42") -> None:
        self.app = app
        self.principal = Principal(
            subject=subject,
            role="member",
            instance_id="inst",
            session_id="sid",
            token_id="jti",
            expires_at=time.time() + 600,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            state_of(scope)[PRINCIPAL] = self.principal
        await self.app(scope, receive, send)


# --- status, pages ---------------------------------------------------------------------------


async def test_status_reports_version_room_count_and_uptime_without_a_token(
    room: httpx.AsyncClient,
) -> None:
    response = await room.get("/api/status")
    assert response.status_code == 200
    body = response.json()
    assert body["ok"] is True
    assert isinstance(body["version"], str)
    assert body["rooms"] == 2
    assert isinstance(body["uptimeSeconds"], int)


async def test_the_dashboard_page_and_its_script_are_served(room: httpx.AsyncClient) -> None:
    page = await room.get("/")
    assert page.status_code == 200
    assert "<title>Quoroom Room</title>" in page.text
    assert 'src="/assets/app.js"' in page.text
    script = await room.get("/assets/app.js")
    assert script.status_code == 200
    assert script.headers["content-type"].startswith("text/javascript")
    assert "/api/status" in script.text


async def test_an_unknown_api_route_is_a_json_404(room: httpx.AsyncClient) -> None:
    response = await room.get("/api/nope", headers=AUTH)
    assert response.status_code == 404
    assert response.json()["code"] == "not_found"


async def test_a_wrong_method_is_a_json_405(room: httpx.AsyncClient) -> None:
    response = await room.delete("/api/rooms", headers=AUTH)
    assert response.status_code == 405
    assert response.json()["code"] == "method_not_allowed"


# --- local mode: handshake and token ---------------------------------------------------------


async def test_the_handshake_gives_a_loopback_client_the_local_token(
    room: httpx.AsyncClient,
) -> None:
    response = await room.get("/api/auth/handshake")
    assert response.status_code == 200
    assert response.json() == {"token": TOKEN}
    assert response.headers["cache-control"] == "no-store"


@pytest.mark.parametrize("client", [("::1", 1), ("::ffff:127.0.0.1", 1), ("127.0.0.9", 1)])
async def test_the_handshake_accepts_every_loopback_address(client: tuple[str, int]) -> None:
    app = create_room_app(local_token=TOKEN)
    async with client_for(app, client=client, base_url="http://localhost:3700") as c:
        assert (await c.get("/api/auth/handshake")).status_code == 200


@pytest.mark.parametrize(
    ("client", "base_url", "headers"),
    [
        (("203.0.113.7", 1), "http://127.0.0.1:3700", {}),
        (("10.0.0.2", 1), "http://localhost", {}),
        (("127.0.0.1", 1), "http://rebound.example", {}),  # DNS rebinding
        (("127.0.0.1", 1), "http://127.0.0.1:3700", {"origin": "https://evil.example"}),
    ],
)
async def test_the_handshake_refuses_anyone_but_this_machine(
    client: tuple[str, int], base_url: str, headers: dict[str, str]
) -> None:
    app = create_room_app(local_token=TOKEN)
    async with client_for(app, client=client, base_url=base_url) as c:
        response = await c.get("/api/auth/handshake", headers=headers)
    assert response.status_code == 403
    assert response.json()["code"] == "handshake_forbidden"
    assert TOKEN not in response.text


async def test_the_handshake_is_refused_when_a_cloud_principal_is_present() -> None:
    async with client_for(WithPrincipal(create_room_app(local_token=TOKEN))) as c:
        response = await c.get("/api/auth/handshake")
    assert response.status_code == 403
    assert response.json()["code"] == "handshake_forbidden"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/rooms"),
        ("GET", "/API/ROOMS"),
        ("POST", "/api/rooms"),
        ("GET", "/api/credentials/c1"),
        ("POST", "/api/decisions/d1/vote"),
        ("GET", "/api/nope"),
    ],
)
async def test_local_mode_requires_the_local_token(
    room: httpx.AsyncClient, method: str, path: str
) -> None:
    response = await room.request(method, path)
    assert response.status_code == 401
    assert response.json() == {"error": "local token required", "code": "unauthenticated"}


@pytest.mark.parametrize(
    "authorization", [f"Bearer {TOKEN}x", "Bearer ", f"Basic {TOKEN}", TOKEN, "Bearer wrong"]
)
async def test_a_wrong_or_malformed_token_is_refused(
    room: httpx.AsyncClient, authorization: str
) -> None:
    response = await room.get("/api/rooms", headers={"authorization": authorization})
    assert response.status_code == 401


async def test_the_bearer_scheme_is_case_insensitive(room: httpx.AsyncClient) -> None:
    response = await room.get("/api/rooms", headers={"authorization": f"bearer {TOKEN}"})
    assert response.status_code == 200


def test_a_random_local_token_is_made_when_none_is_given() -> None:
    first, second = create_room_app(), create_room_app()
    assert len(first.state.local_token) >= 32
    assert first.state.local_token != second.state.local_token


def test_a_short_local_token_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="local_token"):
        create_room_app(local_token="short")


# --- rooms -----------------------------------------------------------------------------------


async def test_rooms_are_listed_and_fetched_with_their_decisions(room: httpx.AsyncClient) -> None:
    rooms = (await room.get("/api/rooms", headers=AUTH)).json()
    assert [r["id"] for r in rooms] == ["r1", "r2"]
    detail = (await room.get("/api/rooms/r1", headers=AUTH)).json()
    assert detail["name"] == "Research lab"
    assert {d["id"] for d in detail["decisions"]} == {"d1", "d2"}
    assert detail["decisions"][0]["tally"] == {"yes": 0, "no": 0, "abstain": 0}
    assert {m["id"] for m in detail["messages"]} == {"m1", "m2"}


async def test_an_unknown_room_is_not_found(room: httpx.AsyncClient) -> None:
    response = await room.get("/api/rooms/r999", headers=AUTH)
    assert response.status_code == 404
    assert response.json() == {"error": "room not found", "code": "not_found"}


async def test_creating_a_room_answers_201_and_records_the_local_actor(
    room: httpx.AsyncClient,
) -> None:
    response = await room.post(
        "/api/rooms", headers=AUTH, json={"name": "  Ops  ", "goal": "Keep it running"}
    )
    assert response.status_code == 201
    created = response.json()
    assert created["name"] == "Ops"
    assert created["goal"] == "Keep it running"
    assert created["createdBy"] == "local"
    assert (await room.get(f"/api/rooms/{created['id']}", headers=AUTH)).status_code == 200
    assert (await room.get("/api/status")).json()["rooms"] == 3


async def test_a_room_without_a_goal_is_fine(room: httpx.AsyncClient) -> None:
    response = await room.post("/api/rooms", headers=AUTH, json={"name": "Solo"})
    assert response.status_code == 201
    assert response.json()["goal"] is None


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({}, "name: is required"),
        ({"name": ""}, "name: must not be blank"),
        ({"name": "   "}, "name: must not be blank"),
        ({"name": 5}, "name: must be a string"),
        ({"name": "x" * 101}, "name: must be at most 100 characters"),
        ({"name": "ok", "goal": 3}, "goal: must be a string"),
        ({"name": "ok", "goal": "g" * 2001}, "goal: must be at most 2000 characters"),
        ({"name": "ok", "owner": "me"}, "owner: is not an accepted field"),
        ([{"name": "ok"}], "body: must be a JSON object"),
        ("ok", "body: must be a JSON object"),
    ],
)
async def test_a_bad_room_body_is_refused_with_invalid_body(
    room: httpx.AsyncClient, body: Any, error: str
) -> None:
    response = await room.post("/api/rooms", headers=AUTH, json=body)
    assert response.status_code == 422
    assert response.json() == {"error": error, "code": "invalid_body"}


@pytest.mark.parametrize(
    "raw", [b"", b"{", b"not json", b'{"name": NaN}', b"\xff\xfe", b"[" * 50_000]
)
async def test_malformed_json_is_refused_with_invalid_json(
    room: httpx.AsyncClient, raw: bytes
) -> None:
    response = await room.post(
        "/api/rooms", headers={**AUTH, "content-type": "application/json"}, content=raw
    )
    assert response.status_code == 400
    assert response.json()["code"] == "invalid_json"


async def test_an_oversized_body_is_refused_with_413(room: httpx.AsyncClient) -> None:
    body = json.dumps({"name": "x", "goal": "g" * 70_000}).encode()
    response = await room.post("/api/rooms", headers=AUTH, content=body)
    assert response.status_code == 413
    assert response.json()["code"] == "body_too_large"


# --- decisions, messages, escalations, credentials -------------------------------------------


@pytest.mark.parametrize("choice", ["yes", "no", "abstain"])
async def test_a_vote_is_recorded_per_user_and_tallied(
    room: httpx.AsyncClient, choice: str
) -> None:
    response = await room.post("/api/decisions/d1/vote", headers=AUTH, json={"vote": choice})
    assert response.status_code == 200
    decision = response.json()
    assert decision["votes"] == {"local": choice}
    assert decision["tally"][choice] == 1
    # Voting again changes the vote, it does not add one.
    again = await room.post("/api/decisions/d1/vote", headers=AUTH, json={"vote": "no"})
    assert sum(again.json()["tally"].values()) == 1


async def test_a_keeper_vote_is_recorded_apart_from_member_votes(
    room: httpx.AsyncClient,
) -> None:
    response = await room.post("/api/decisions/d2/keeper-vote", headers=AUTH, json={"vote": "no"})
    assert response.status_code == 200
    decision = response.json()
    assert decision["keeperVote"]["vote"] == "no"
    assert decision["keeperVote"]["by"] == "local"
    assert decision["votes"] == {}


@pytest.mark.parametrize("path", ["/api/decisions/d1/vote", "/api/decisions/d1/keeper-vote"])
@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({}, "vote: is required"),
        ({"vote": "maybe"}, "vote: must be one of yes, no, abstain"),
        ({"vote": True}, "vote: must be one of yes, no, abstain"),
        ({"vote": "yes", "weight": 10}, "weight: is not an accepted field"),
    ],
)
async def test_a_bad_vote_is_refused_with_invalid_body(
    room: httpx.AsyncClient, path: str, body: dict[str, Any], error: str
) -> None:
    response = await room.post(path, headers=AUTH, json=body)
    assert response.status_code == 422
    assert response.json() == {"error": error, "code": "invalid_body"}


async def test_voting_on_an_unknown_decision_is_not_found(room: httpx.AsyncClient) -> None:
    response = await room.post("/api/decisions/d999/vote", headers=AUTH, json={"vote": "yes"})
    assert response.status_code == 404
    assert response.json()["code"] == "not_found"


async def test_voting_on_a_closed_decision_is_a_conflict() -> None:
    app = create_room_app(local_token=TOKEN)
    app.state.room_store.collection("decisions")["d1"]["status"] = "approved"
    async with client_for(app) as c:
        response = await c.post("/api/decisions/d1/vote", headers=AUTH, json={"vote": "yes"})
    assert response.status_code == 409
    assert response.json()["code"] == "decision_closed"


async def test_marking_a_message_read_records_who_and_is_idempotent(
    room: httpx.AsyncClient,
) -> None:
    first = await room.post("/api/rooms/r1/messages/m1/read", headers=AUTH)
    assert first.status_code == 200
    assert first.json()["readBy"] == "local"
    read_at = first.json()["readAt"]
    second = await room.post("/api/rooms/r1/messages/m1/read", headers=AUTH)
    assert second.json()["readAt"] == read_at


@pytest.mark.parametrize(
    "path", ["/api/rooms/r2/messages/m1/read", "/api/rooms/r9/messages/m1/read"]
)
async def test_marking_a_message_of_another_or_unknown_room_is_not_found(
    room: httpx.AsyncClient, path: str
) -> None:
    response = await room.post(path, headers=AUTH)
    assert response.status_code == 404


async def test_a_reply_is_added_to_the_message(room: httpx.AsyncClient) -> None:
    response = await room.post("/api/messages/m2/reply", headers=AUTH, json={"text": "Noted."})
    assert response.status_code == 201
    assert response.json()["text"] == "Noted."
    detail = (await room.get("/api/rooms/r1", headers=AUTH)).json()
    m2 = next(m for m in detail["messages"] if m["id"] == "m2")
    assert [r["text"] for r in m2["replies"]] == ["Noted."]


@pytest.mark.parametrize(
    ("body", "status"),
    [({}, 422), ({"text": ""}, 422), ({"text": ["a"]}, 422), ({"text": "x" * 10_001}, 422)],
)
async def test_a_bad_reply_is_refused(
    room: httpx.AsyncClient, body: dict[str, Any], status: int
) -> None:
    response = await room.post("/api/messages/m2/reply", headers=AUTH, json=body)
    assert response.status_code == status
    assert response.json()["code"] == "invalid_body"


async def test_replying_to_an_unknown_message_is_not_found(room: httpx.AsyncClient) -> None:
    response = await room.post("/api/messages/m404/reply", headers=AUTH, json={"text": "hi"})
    assert response.status_code == 404


async def test_an_escalation_is_resolved_once(room: httpx.AsyncClient) -> None:
    response = await room.post(
        "/api/escalations/e1/resolve", headers=AUTH, json={"resolution": "Yes, go ahead."}
    )
    assert response.status_code == 200
    escalation = response.json()
    assert escalation["status"] == "resolved"
    assert escalation["resolution"] == "Yes, go ahead."
    assert escalation["resolvedBy"] == "local"
    again = await room.post("/api/escalations/e1/resolve", headers=AUTH, json={})
    assert again.status_code == 409
    assert again.json()["code"] == "already_resolved"


async def test_an_escalation_may_be_resolved_without_a_resolution_text(
    room: httpx.AsyncClient,
) -> None:
    response = await room.post("/api/escalations/e2/resolve", headers=AUTH, json={})
    assert response.status_code == 200
    assert response.json()["resolution"] is None


@pytest.mark.parametrize(
    ("path", "body", "status", "code"),
    [
        ("/api/escalations/e1/resolve", {"resolution": 1}, 422, "invalid_body"),
        ("/api/escalations/e1/resolve", {"resolution": "r" * 2001}, 422, "invalid_body"),
        ("/api/escalations/e9/resolve", {}, 404, "not_found"),
    ],
)
async def test_a_bad_resolution_is_refused(
    room: httpx.AsyncClient, path: str, body: dict[str, Any], status: int, code: str
) -> None:
    response = await room.post(path, headers=AUTH, json=body)
    assert response.status_code == status
    assert response.json()["code"] == code


async def test_a_credential_is_returned_masked(room: httpx.AsyncClient) -> None:
    response = await room.get("/api/credentials/c1", headers=AUTH)
    assert response.status_code == 200
    record = response.json()
    assert record["name"] == "openai_api_key"
    assert record["valueEncrypted"] == "***"
    assert (await room.get("/api/credentials/c404", headers=AUTH)).status_code == 404


# --- behind the cloud stack ------------------------------------------------------------------


async def test_a_principal_from_the_stack_is_trusted_without_the_local_token() -> None:
    async with client_for(WithPrincipal(create_room_app(local_token=TOKEN))) as c:
        assert (await c.get("/api/rooms")).status_code == 200
        created = await c.post("/api/rooms", json={"name": "Cloud room"})
        assert created.status_code == 201
        assert created.json()["createdBy"] == "user-42"
        vote = await c.post("/api/decisions/d1/vote", json={"vote": "yes"})
        assert vote.json()["votes"] == {"user-42": "yes"}


# --- persistence -----------------------------------------------------------------------------


async def test_state_survives_a_restart_with_the_same_data_dir(tmp_path: Path) -> None:
    async with client_for(create_room_app(data_dir=str(tmp_path), local_token=TOKEN)) as c:
        created = (await c.post("/api/rooms", headers=AUTH, json={"name": "Kept"})).json()
        await c.post("/api/decisions/d1/vote", headers=AUTH, json={"vote": "abstain"})
        await c.post("/api/escalations/e1/resolve", headers=AUTH, json={"resolution": "ok"})
    assert (tmp_path / SNAPSHOT_NAME).exists()
    assert [p.name for p in tmp_path.iterdir()] == [SNAPSHOT_NAME]  # no temp files left

    async with client_for(create_room_app(data_dir=str(tmp_path), local_token=TOKEN)) as c:
        assert (await c.get(f"/api/rooms/{created['id']}", headers=AUTH)).json()["name"] == "Kept"
        detail = (await c.get("/api/rooms/r1", headers=AUTH)).json()
        d1 = next(d for d in detail["decisions"] if d["id"] == "d1")
        assert d1["votes"] == {"local": "abstain"}
        # Ids keep counting from where they were: no reuse after a restart.
        again = (await c.post("/api/rooms", headers=AUTH, json={"name": "Next"})).json()
        assert again["id"] != created["id"]


async def test_a_missing_data_dir_is_created(tmp_path: Path) -> None:
    target = tmp_path / "volume" / "room"
    async with client_for(create_room_app(data_dir=str(target), local_token=TOKEN)) as c:
        await c.post("/api/rooms", headers=AUTH, json={"name": "x"})
    assert (target / SNAPSHOT_NAME).is_file()


@pytest.mark.parametrize("content", ["{not json", '{"format": 99}', "[]", '{"format": 1}'])
def test_a_corrupt_snapshot_stops_start_up_instead_of_being_overwritten(
    tmp_path: Path, content: str
) -> None:
    (tmp_path / SNAPSHOT_NAME).write_text(content)
    with pytest.raises(ConfigError) as info:
        create_room_app(data_dir=str(tmp_path))
    assert info.value.setting == "data_dir"
    assert (tmp_path / SNAPSHOT_NAME).read_text() == content


# --- WebSocket -------------------------------------------------------------------------------


def test_a_subscriber_receives_a_vote_event_for_its_room() -> None:
    app = create_room_app(local_token=TOKEN)
    with (
        TestClient(app) as tc,
        tc.websocket_connect(f"/ws?token={TOKEN}") as ws,
    ):
        ws.send_json({"type": "subscribe", "roomId": "r1"})
        assert ws.receive_json() == {"type": "subscribed", "roomId": "r1"}
        # A vote in another room is not delivered; the one in r1 is.
        tc.post("/api/decisions/d3/vote", headers=AUTH, json={"vote": "yes"})
        tc.post("/api/decisions/d1/vote", headers=AUTH, json={"vote": "yes"})
        event = ws.receive_json()
        assert event["type"] == "vote"
        assert event["roomId"] == "r1"
        assert event["decisionId"] == "d1"
        assert event["vote"] == "yes"
        assert event["by"] == "local"


def test_a_subscriber_receives_room_message_and_escalation_events() -> None:
    app = create_room_app(local_token=TOKEN)
    with TestClient(app) as tc, tc.websocket_connect("/ws", headers=AUTH) as ws:
        ws.send_json({"type": "subscribe", "roomId": "*"})
        ws.receive_json()
        tc.post("/api/rooms", headers=AUTH, json={"name": "New"})
        assert ws.receive_json()["type"] == "room.created"
        tc.post("/api/rooms/r1/messages/m1/read", headers=AUTH)
        assert ws.receive_json()["type"] == "message.read"
        tc.post("/api/messages/m1/reply", headers=AUTH, json={"text": "ok"})
        assert ws.receive_json()["type"] == "message.reply"
        tc.post("/api/escalations/e1/resolve", headers=AUTH, json={})
        assert ws.receive_json()["type"] == "escalation.resolved"


def test_bad_websocket_messages_are_answered_with_errors_not_a_crash() -> None:
    app = create_room_app(local_token=TOKEN)
    with TestClient(app) as tc, tc.websocket_connect("/ws", headers=AUTH) as ws:
        cases: list[tuple[Any, str]] = [
            ("not json", "invalid_json"),
            ("[1, 2]", "invalid_message"),
            ('{"type": "dance"}', "unknown_type"),
            ('{"type": "subscribe"}', "invalid_message"),
            ('{"type": "subscribe", "roomId": 7}', "invalid_message"),
            ('{"type": "subscribe", "roomId": "r404"}', "not_found"),
            ("x" * 20_000, "message_too_large"),
        ]
        for text, code in cases:
            ws.send_text(text)
            reply = ws.receive_json()
            assert reply["type"] == "error"
            assert reply["code"] == code
        ws.send_bytes(b"\xff")
        assert ws.receive_json()["code"] == "invalid_json"
        # Still alive and well after all that.
        ws.send_json({"type": "ping"})
        assert ws.receive_json() == {"type": "pong"}


def test_an_unsubscribed_socket_stops_receiving_events() -> None:
    app = create_room_app(local_token=TOKEN)
    with TestClient(app) as tc, tc.websocket_connect("/ws", headers=AUTH) as ws:
        ws.send_json({"type": "subscribe", "roomId": "r1"})
        ws.receive_json()
        ws.send_json({"type": "unsubscribe", "roomId": "r1"})
        assert ws.receive_json() == {"type": "unsubscribed", "roomId": "r1"}
        tc.post("/api/decisions/d1/vote", headers=AUTH, json={"vote": "yes"})
        ws.send_json({"type": "ping"})
        assert ws.receive_json() == {"type": "pong"}  # no vote event came first


@pytest.mark.parametrize("query", ["", "?token=wrong"])
def test_the_websocket_requires_the_local_token_in_local_mode(query: str) -> None:
    app = create_room_app(local_token=TOKEN)
    with (
        TestClient(app) as tc,
        pytest.raises(WebSocketDenialResponse) as info,
        tc.websocket_connect(f"/ws{query}"),
    ):
        pass
    assert info.value.status_code == 401
    assert info.value.json()["code"] == "unauthenticated"


def test_the_websocket_trusts_a_principal_from_the_stack() -> None:
    app = WithPrincipal(create_room_app(local_token=TOKEN))
    with TestClient(app) as tc, tc.websocket_connect("/ws") as ws:
        ws.send_json({"type": "ping"})
        assert ws.receive_json() == {"type": "pong"}


async def test_a_subscriber_that_cannot_keep_up_is_cut_off_not_buffered_forever() -> None:
    import anyio

    from room_cloud_runtime.reference.events import EventHub, _Subscriber

    send, receive = anyio.create_memory_object_stream[dict[str, Any]](1)
    subscriber = _Subscriber(send)
    subscriber.rooms.add("r1")
    hub = EventHub()
    hub.add(subscriber)
    hub.publish("r1", {"type": "vote"})
    hub.publish("r1", {"type": "vote"})  # buffer full: cut off
    assert subscriber.overflowed
    assert not subscriber.offer({"type": "pong"})
    assert (await receive.receive())["type"] == "vote"  # what was queued still drains
    receive.close()
