"""The fake Machines API itself: it validates bodies against the spec and behaves like Fly."""

from __future__ import annotations

import httpx
import pytest

from tests.fakes.fly_machines import DEFAULT_ORG, DEFAULT_TOKEN, OpenAPISpec, _convert

AUTH = {"Authorization": f"Bearer {DEFAULT_TOKEN}"}
IMAGE = "registry.fly.io/x@sha256:" + "c" * 64


@pytest.fixture
async def http(fly_machines_fake):
    async with httpx.AsyncClient(base_url=fly_machines_fake.url, headers=AUTH) as client:
        await client.post("/v1/apps", json={"name": "qr-app", "org_slug": DEFAULT_ORG})
        yield client


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"config": {"image": IMAGE, "guest": {"cpus": "two"}}}, "config/guest/cpus"),
        ({"config": {"image": IMAGE, "services": [{"internal_Port": 8080}]}}, "internal_Port"),
        ({"config": {"image": IMAGE}, "regoin": "ams"}, "regoin"),
        ({"config": {"image": IMAGE, "restart": {"policy": "sometimes"}}}, "policy"),
        ({"config": {"image": IMAGE, "env": {"A": 1}}}, "config/env/A"),
        ({"config": "not an object"}, "config"),
    ],
)
async def test_an_invalid_create_machine_body_is_answered_400_naming_the_problem(
    http, fly_machines_fake, body, needle
):
    reply = await http.post("/v1/apps/qr-app/machines", json=body)
    assert reply.status_code == 400
    assert needle in reply.json()["error"]
    assert fly_machines_fake.live_machines() == []


async def test_a_body_that_is_not_json_is_answered_400(http):
    reply = await http.post("/v1/apps/qr-app/volumes", content=b"{nope")
    assert reply.status_code == 400


async def test_stop_without_a_body_is_a_400_as_on_fly(http):
    created = await http.post(
        "/v1/apps/qr-app/machines", json={"config": {"image": IMAGE}, "region": "ams"}
    )
    machine_id = created.json()["id"]
    assert (await http.post(f"/v1/apps/qr-app/machines/{machine_id}/stop")).status_code == 400
    stopped = await http.post(f"/v1/apps/qr-app/machines/{machine_id}/stop", json={})
    assert stopped.status_code == 200


@pytest.mark.parametrize(
    ("query", "status"),
    [
        ({"state": "started", "timeout": "61"}, 400),
        ({"state": "started", "timeout": "0"}, 400),
        ({"state": "stopped", "timeout": "1"}, 400),  # no version: superfly/flyctl#1751
        ({"state": "sleeping"}, 400),
        ({"state": "started", "timeout": "1"}, 200),
    ],
)
async def test_wait_enforces_its_documented_parameters(http, query, status):
    created = await http.post(
        "/v1/apps/qr-app/machines", json={"config": {"image": IMAGE}, "region": "ams"}
    )
    reply = await http.get(f"/v1/apps/qr-app/machines/{created.json()['id']}/wait", params=query)
    assert reply.status_code == status


async def test_wait_answers_408_when_the_state_is_not_reached_in_time(http, fly_machines_fake):
    fly_machines_fake.set_start_delay(30)
    created = await http.post(
        "/v1/apps/qr-app/machines", json={"config": {"image": IMAGE}, "region": "ams"}
    )
    reply = await http.get(
        f"/v1/apps/qr-app/machines/{created.json()['id']}/wait", params={"timeout": 1}
    )
    assert reply.status_code == 408


async def test_a_wrong_token_is_401(fly_machines_fake):
    async with httpx.AsyncClient(base_url=fly_machines_fake.url) as client:
        reply = await client.get("/v1/apps/qr-app", headers={"Authorization": "Bearer nope"})
    assert reply.status_code == 401


async def test_a_dropped_reply_still_performs_the_action(http, fly_machines_fake):
    fly_machines_fake.drop_next("Volumes_create")
    with pytest.raises(httpx.RemoteProtocolError):
        await http.post(
            "/v1/apps/qr-app/volumes", json={"name": "d", "region": "ams", "size_gb": 1}
        )
    assert len(fly_machines_fake.volumes) == 1
    assert fly_machines_fake.calls_to("Volumes_create")[-1].status is None


async def test_deleting_an_app_takes_its_machines_volumes_and_snapshots(http, fly_machines_fake):
    volume = (
        await http.post(
            "/v1/apps/qr-app/volumes", json={"name": "d", "region": "ams", "size_gb": 1}
        )
    ).json()
    await http.post(f"/v1/apps/qr-app/volumes/{volume['id']}/snapshots")
    await http.post("/v1/apps/qr-app/machines", json={"config": {"image": IMAGE}, "region": "ams"})
    assert (await http.delete("/v1/apps/qr-app")).status_code == 202
    assert fly_machines_fake.volumes == {} and fly_machines_fake.live_machines() == []
    assert (await http.get(f"/v1/apps/qr-app/volumes/{volume['id']}/snapshots")).status_code == 404


def test_every_operation_the_fake_serves_exists_in_the_spec(fly_machines_fake):
    spec_ops = {route[2] for route in fly_machines_fake.spec.routes}
    assert set(fly_machines_fake._handlers) <= spec_ops
    with pytest.raises(ValueError):
        fly_machines_fake.fail_next("Machines_teleport")


def test_openapi_nullable_becomes_a_json_schema_null_type():
    converted = _convert({"type": "integer", "nullable": True, "example": 3}, strict=True)
    assert converted == {"type": ["integer", "null"]}


def test_the_spec_routes_literal_paths_before_templated_ones():
    spec = OpenAPISpec()
    assert spec.match("POST", "/v1/apps/a/certificates/acme")[0] == "App_Certificates_acme_create"
    assert spec.match("GET", "/v1/apps/a/machines/m/wait")[0] == "Machines_wait"
    assert spec.match("GET", "/v2/nothing") is None
