"""The Fly Machines API client against the fake Machines API (a real server on loopback)."""

from __future__ import annotations

import logging
import socket

import httpx
import pytest

from control_plane.provisioning.fly_api import (
    FlyAuthError,
    FlyCapacity,
    FlyConflict,
    FlyError,
    FlyMachinesClient,
    FlyNameTaken,
    FlyNotFound,
    FlyPreconditionFailed,
    FlyProtocolError,
    FlyRateLimited,
    FlyServerError,
    FlyTimeout,
    FlyUnavailable,
    FlyUnhealthy,
)
from tests.fakes.fly_machines import DEFAULT_ORG, DEFAULT_TOKEN

APP = "qr-inst-1"
IMAGE = "registry.fly.io/quoroom-runtime@sha256:" + "a" * 64
GUEST = {"cpu_kind": "shared", "cpus": 1, "memory_mb": 512}


def machine_config(volume_id: str | None = None, instance_id: str = "inst-1") -> dict:
    config = {
        "image": IMAGE,
        "guest": GUEST,
        "metadata": {"quoroom_instance_id": instance_id, "managed_by": "quoroom-cloud"},
        "checks": {"healthz": {"type": "http", "port": 8080, "path": "/healthz"}},
    }
    if volume_id:
        config["mounts"] = [{"volume": volume_id, "path": "/data"}]
    return config


async def provision(client, region: str = "ams", instance_id: str = "inst-1"):
    await client.create_app(APP, idempotency_key=f"app-{instance_id}")
    volume = await client.create_volume(APP, name="data", region=region, size_gb=1, compute=GUEST)
    machine = await client.create_machine(
        APP,
        config=machine_config(volume.id, instance_id),
        region=volume.region,
        name=f"room-{instance_id}",
    )
    return volume, machine


# ------------------------------------------------------------------------------ happy paths


async def test_a_room_is_provisioned_started_healthy_stopped_restarted_and_destroyed(
    fly_client, fly_machines_fake
):
    app = await fly_client.create_app(APP, idempotency_key="app-inst-1")
    assert app.name == APP and app.org_slug == DEFAULT_ORG
    version = await fly_client.set_secrets(APP, {"OPENAI_API_KEY": "sk-secret"})
    assert version == 1
    ip = await fly_client.allocate_ip(APP)
    assert ip.shared is True and [i.ip for i in await fly_client.list_ips(APP)] == [ip.ip]
    volume = await fly_client.create_volume(
        APP, name="data", region="ams", size_gb=1, compute=GUEST
    )
    assert volume.region == "ams" and volume.zone
    machine = await fly_client.create_machine(
        APP,
        config=machine_config(volume.id),
        region=volume.region,
        name="room-inst-1",
        min_secrets_version=version,
    )
    assert machine.region == "ams"
    assert (await fly_client.get_volume(APP, volume.id)).attached_machine_id == machine.id

    waited = await fly_client.wait(APP, machine.id, "started", timeout_total=10)
    assert waited.state == "started"
    healthy = await fly_client.wait_healthy(APP, machine.id, timeout_total=5, poll_interval=0.02)
    assert [c.status for c in healthy.checks] == ["passing"]

    await fly_client.stop_machine(APP, machine.id)
    assert fly_machines_fake.calls_to("Machines_stop")[-1].body == {}  # superfly/docs#2187
    await fly_client.wait(APP, machine.id, "stopped", version=machine.version, timeout_total=10)
    await fly_client.start_machine(APP, machine.id)
    await fly_client.wait(APP, machine.id, "started", timeout_total=10)

    await fly_client.create_volume_snapshot(APP, volume.id)
    (snapshot,) = await fly_client.list_volume_snapshots(APP, volume.id)
    assert snapshot.id.startswith("vs_")

    await fly_client.delete_machine(APP, machine.id, force=True)
    assert (await fly_client.get_machine(APP, machine.id)).state == "destroyed"
    await fly_client.delete_volume(APP, volume.id)
    await fly_client.delete_app(APP)
    with pytest.raises(FlyNotFound):
        await fly_client.get_app(APP)


async def test_machines_are_listed_by_metadata_so_the_reconciler_finds_its_own(fly_client):
    await provision(fly_client, instance_id="inst-1")
    other = await fly_client.create_machine(
        APP, config=machine_config(instance_id="inst-2"), region="ams", name="room-inst-2"
    )
    found = await fly_client.list_machines(APP, metadata={"quoroom_instance_id": "inst-2"})
    assert [m.id for m in found] == [other.id]
    assert len(await fly_client.list_machines(APP, metadata={"managed_by": "quoroom-cloud"})) == 2
    assert await fly_client.list_machines(APP, metadata={"quoroom_instance_id": "nope"}) == []
    assert [a.name for a in await fly_client.list_apps()] == [APP]


async def test_a_machine_must_follow_its_volume_into_the_volumes_region(fly_client):
    await fly_client.create_app(APP)
    volume = await fly_client.create_volume(APP, name="data", region="ams", size_gb=1)
    with pytest.raises(FlyError) as caught:
        await fly_client.create_machine(APP, config=machine_config(volume.id), region="iad")
    assert caught.value.status_code == 400


# ------------------------------------------------------------------------------ /wait


async def test_wait_keeps_waiting_through_408s(fly_client, fly_machines_fake):
    _, machine = await provision(fly_client)
    fly_machines_fake.fail_next("Machines_wait", 408, times=3)
    result = await fly_client.wait(APP, machine.id, "started", timeout_total=10)
    assert result.state == "started"
    assert len(fly_machines_fake.calls_to("Machines_wait")) == 4


async def test_wait_asks_for_at_most_60_seconds_per_request(fly_client, fly_machines_fake):
    _, machine = await provision(fly_client)
    await fly_client.wait(APP, machine.id, "started", timeout_total=600)
    assert fly_machines_fake.calls_to("Machines_wait")[-1].query["timeout"] == "60"
    with pytest.raises(ValueError):
        await fly_client.wait(APP, machine.id, per_request_timeout=61)


async def test_a_slow_start_is_waited_for_across_several_wait_calls(fly_client, fly_machines_fake):
    fly_machines_fake.set_start_delay(1.5)
    _, machine = await provision(fly_client)
    result = await fly_client.wait(APP, machine.id, timeout_total=10, per_request_timeout=1)
    assert result.state == "started"
    assert len(fly_machines_fake.calls_to("Machines_wait")) >= 2


async def test_wait_gives_up_with_fly_timeout_at_the_overall_deadline(
    fly_client, fly_machines_fake
):
    fly_machines_fake.set_start_delay(60)
    _, machine = await provision(fly_client)
    with pytest.raises(FlyTimeout):
        await fly_client.wait(APP, machine.id, timeout_total=1.2, per_request_timeout=1)


async def test_waiting_for_stopped_without_the_version_is_refused_before_any_call(fly_client):
    with pytest.raises(ValueError, match="version"):
        await fly_client.wait(APP, "m1", "stopped")


async def test_a_machine_whose_checks_never_pass_is_reported_unhealthy(
    fly_client, fly_machines_fake
):
    fly_machines_fake.mark_image_unhealthy(IMAGE)
    _, machine = await provision(fly_client)
    await fly_client.wait(APP, machine.id, timeout_total=10)
    with pytest.raises(FlyUnhealthy) as caught:
        await fly_client.wait_healthy(APP, machine.id, timeout_total=0.5, poll_interval=0.05)
    assert [c.status for c in caught.value.checks] == ["critical"]


# ------------------------------------------------------------------------------ error mapping


@pytest.mark.parametrize(
    ("status", "fly_status", "message", "error"),
    [
        (
            412,
            None,
            "insufficient resources to create new machine with existing volume",
            FlyCapacity,
        ),
        (500, "insufficient_capacity", None, FlyCapacity),
        (409, None, None, FlyConflict),
        (503, None, None, FlyServerError),
        (500, None, None, FlyServerError),
        (401, None, None, FlyAuthError),
    ],
)
async def test_provider_errors_on_create_are_mapped_and_the_create_is_sent_only_once(
    fly_client, fly_machines_fake, status, fly_status, message, error
):
    await fly_client.create_app(APP)
    fly_machines_fake.fail_next("Machines_create", status, fly_status=fly_status, message=message)
    with pytest.raises(error) as caught:
        await fly_client.create_machine(APP, config=machine_config(), region="ams")
    assert caught.value.status_code == status
    assert len(fly_machines_fake.calls_to("Machines_create")) == 1  # never a blind retry
    assert fly_machines_fake.live_machines(APP) == []


async def test_reads_retry_5xx_and_then_succeed(fly_client, fly_machines_fake):
    _, machine = await provision(fly_client)
    fly_machines_fake.fail_next("Machines_show", 503, times=2)
    assert (await fly_client.get_machine(APP, machine.id)).id == machine.id
    assert len(fly_machines_fake.calls_to("Machines_show")) == 3


async def test_reads_give_up_after_the_bounded_number_of_attempts(fly_client, fly_machines_fake):
    fly_machines_fake.fail_next("Apps_show", 502, times=5)
    with pytest.raises(FlyServerError):
        await fly_client.get_app(APP)
    assert len(fly_machines_fake.calls_to("Apps_show")) == 3


async def test_rate_limits_carry_retry_after_and_reads_honour_it(fly_client, fly_machines_fake):
    await fly_client.create_app(APP)
    fly_machines_fake.fail_next("Apps_show", 429, retry_after=0.05)
    assert (await fly_client.get_app(APP)).name == APP
    fly_machines_fake.fail_next("Volumes_create", 429, retry_after=7)
    with pytest.raises(FlyRateLimited) as caught:
        await fly_client.create_volume(APP, name="data", region="ams", size_gb=1)
    assert caught.value.retry_after == 7


async def test_a_missing_machine_is_fly_not_found(fly_client):
    await fly_client.create_app(APP)
    with pytest.raises(FlyNotFound) as caught:
        await fly_client.get_machine(APP, "0123456789abcd")
    assert caught.value.status_code == 404 and caught.value.path.endswith("0123456789abcd")


async def test_an_update_from_a_stale_version_is_a_conflict_and_changes_nothing(fly_client):
    _, machine = await provision(fly_client)
    config = dict(machine.config, image=IMAGE.replace("a" * 64, "b" * 64))
    updated = await fly_client.update_machine(
        APP, machine.id, config=config, current_version=machine.version
    )
    assert updated.version != machine.version
    with pytest.raises(FlyConflict):
        await fly_client.update_machine(
            APP, machine.id, config=machine.config, current_version=machine.version
        )
    assert (await fly_client.get_machine(APP, machine.id)).image == config["image"]


async def test_destroying_a_started_machine_needs_force(fly_client):
    _, machine = await provision(fly_client)
    await fly_client.wait(APP, machine.id, timeout_total=10)
    with pytest.raises(FlyPreconditionFailed):
        await fly_client.delete_machine(APP, machine.id)
    await fly_client.delete_machine(APP, machine.id, force=True)


# ------------------------------------------------------------------------------ app names


async def test_create_app_with_the_same_idempotency_key_returns_the_same_app(
    fly_client, fly_machines_fake
):
    first = await fly_client.create_app(APP, idempotency_key="k-1")
    again = await fly_client.create_app(APP, idempotency_key="k-1")
    assert again.id == first.id
    assert len(fly_machines_fake.apps) == 1


async def test_name_taken_by_our_own_org_is_verified_by_a_get_and_reused(
    fly_client, fly_machines_fake
):
    first = await fly_client.create_app(APP)
    again = await fly_client.create_app(APP)  # no key: 422 name_taken → GET → ours
    assert again.id == first.id and again.org_slug == DEFAULT_ORG
    assert [c.operation for c in fly_machines_fake.calls][-2:] == ["Apps_create", "Apps_show"]


@pytest.mark.parametrize("visible", [True, False])
async def test_name_taken_by_another_org_is_refused(fly_client, fly_machines_fake, visible):
    fly_machines_fake.add_foreign_app(APP, org_slug="someone-else", visible=visible)
    with pytest.raises(FlyNameTaken) as caught:
        await fly_client.create_app(APP)
    assert caught.value.fly_status == "name_taken"


async def test_a_lost_create_app_reply_is_resent_with_the_same_key_and_makes_one_app(
    fly_client, fly_machines_fake
):
    fly_machines_fake.drop_next("Apps_create")
    app = await fly_client.create_app(APP, idempotency_key="k-1")
    assert app.name == APP
    assert len(fly_machines_fake.calls_to("Apps_create")) == 2
    assert list(fly_machines_fake.apps) == [APP]


# ------------------------------------------------------------------------------ lost replies


async def test_a_lost_create_machine_reply_is_not_resent_and_listing_finds_the_one_machine(
    fly_client, fly_machines_fake
):
    await fly_client.create_app(APP)
    fly_machines_fake.drop_next("Machines_create")
    with pytest.raises(FlyUnavailable) as caught:
        await fly_client.create_machine(
            APP, config=machine_config(), region="ams", name="room-inst-1"
        )
    assert caught.value.maybe_applied is True
    assert len(fly_machines_fake.calls_to("Machines_create")) == 1
    # What the provider does next: look for it by metadata instead of creating another.
    (found,) = await fly_client.list_machines(APP, metadata={"quoroom_instance_id": "inst-1"})
    assert found.name == "room-inst-1"
    assert len(fly_machines_fake.live_machines(APP)) == 1
    # And a second create under the same deterministic name is refused, not duplicated.
    with pytest.raises(FlyConflict):
        await fly_client.create_machine(
            APP, config=machine_config(), region="ams", name="room-inst-1"
        )
    assert len(fly_machines_fake.live_machines(APP)) == 1


async def test_a_refused_connection_is_unavailable_and_known_not_applied():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with FlyMachinesClient(
        DEFAULT_TOKEN, org_slug=DEFAULT_ORG, base_url=f"http://127.0.0.1:{port}", retry_backoff=0
    ) as client:
        with pytest.raises(FlyUnavailable) as caught:
            await client.create_app(APP)
    assert caught.value.maybe_applied is False


# ------------------------------------------------------------------------------ replies validated


@pytest.mark.parametrize(
    "reply",
    [
        httpx.Response(200, json={"state": "started", "version": "v1"}),  # no id
        httpx.Response(200, json={"id": "m1", "state": "started"}),  # no version
        httpx.Response(200, text="<html>gateway</html>"),
        httpx.Response(200, json=["not", "an", "object"]),
    ],
)
async def test_a_reply_missing_required_fields_is_a_protocol_error(reply):
    transport = httpx.MockTransport(lambda request: reply)
    async with FlyMachinesClient("t", org_slug="o", transport=transport) as client:
        with pytest.raises(FlyProtocolError):
            await client.get_machine(APP, "m1")


async def test_list_machines_drops_machines_a_server_returned_despite_the_filter():
    stranger = {"id": "m2", "state": "started", "version": "v", "config": {"metadata": {}}}
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json=[stranger]))
    async with FlyMachinesClient("t", org_slug="o", transport=transport) as client:
        assert await client.list_machines(APP, metadata={"quoroom_instance_id": "i"}) == []


# ------------------------------------------------------------------------------ leases


async def test_writes_to_a_leased_machine_need_the_lease_nonce(fly_client):
    _, machine = await provision(fly_client)
    lease = await fly_client.acquire_lease(APP, machine.id, ttl=30)
    with pytest.raises(FlyConflict):
        await fly_client.stop_machine(APP, machine.id)
    await fly_client.stop_machine(APP, machine.id, lease_nonce=lease.nonce)
    await fly_client.release_lease(APP, machine.id, lease.nonce)
    await fly_client.start_machine(APP, machine.id)


# ------------------------------------------------------------------------------ the token


async def test_the_api_token_never_appears_in_repr_errors_or_logs(fly_machines_fake, caplog):
    token = "fo1_super-secret-token-value"
    caplog.set_level(logging.DEBUG)
    async with FlyMachinesClient(
        token, org_slug=DEFAULT_ORG, base_url=fly_machines_fake.url, retry_backoff=0
    ) as client:
        assert token not in repr(client)
        with pytest.raises(FlyAuthError) as caught:
            await client.get_app(APP)
    assert token not in str(caught.value) and token not in repr(caught.value)
    assert token not in caplog.text


async def test_a_flyv1_macaroon_token_is_sent_as_is_and_others_as_bearer():
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["authorization"])
        return httpx.Response(200, json={"id": "a", "name": APP})

    for token in ("FlyV1 fm2_abc", "plain"):
        transport = httpx.MockTransport(handler)
        async with FlyMachinesClient(token, org_slug="o", transport=transport) as client:
            await client.get_app(APP)
    assert seen == ["FlyV1 fm2_abc", "Bearer plain"]


async def test_path_segments_that_could_escape_the_path_are_refused():
    transport = httpx.MockTransport(lambda request: httpx.Response(500))
    async with FlyMachinesClient("t", org_slug="o", transport=transport) as client:
        for bad in ("../apps", "a/b", "", "x?y", ".."):
            with pytest.raises(ValueError):
                await client.get_app(bad)
