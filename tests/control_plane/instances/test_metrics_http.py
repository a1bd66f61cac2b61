"""Control-plane metrics through real requests (issue 14, item 1): the app is driven over HTTP and
scraped over a real loopback socket on ``QUOROOM_CP_METRICS_PORT``; the counters move, labels
hold route templates (never raw paths, ids or emails), and ``/metrics`` is never on the app."""

from __future__ import annotations

import json
from typing import Any

from control_plane.metrics import Metrics
from tests.control_plane.conftest import PASSWORD
from tests.control_plane.metrics_helpers import free_port, scrape

from .test_runtime_tokens import _refresh, _token


async def test_requests_auth_tokens_webhooks_and_fleet_are_counted(
    make_cloud: Any, stripe_fake: Any
) -> None:
    port = free_port()
    async with make_cloud(
        stripe_fake,
        metrics_port=port,
        refresh_reuse_grace_seconds=0,
        throttle_login_account_address="1/minute",
    ) as cloud:
        before = await scrape(port)
        assert before.value("quoroom_cp_database_scrape_ok") == 1
        assert before.value("quoroom_cp_instances", status="running") == 0

        # Sign-in: one failure, then throttled (1/minute per account and address), one success.
        bad = {"email": "nobody@example.com", "password": "wrong password"}
        assert (await cloud.client.post("/api/auth/login", json=bad)).status_code == 401
        assert (await cloud.client.post("/api/auth/login", json=bad)).status_code == 429
        owner = await cloud.user("owner@example.com")
        # Refresh-token reuse: the first rotation is fine, the replay revokes the session.
        r = await cloud.client.post(
            "/api/auth/login",
            json={"email": owner.email, "password": PASSWORD, "transport": "body"},
        )
        refresh_token = r.json()["refresh_token"]
        body = {"refresh_token": refresh_token}
        assert (await cloud.client.post("/api/auth/refresh", json=body)).status_code == 200
        cloud.h.clock.advance(1)
        reused = await cloud.client.post("/api/auth/refresh", json=body)
        assert reused.status_code == 401 and reused.json()["code"] == "refresh_token_reused"

        # A paid Room (two signed webhooks applied), one forged webhook, a runtime token and
        # its refresh, and a path no route knows.
        instance_id = await cloud.paid_and_running(owner)
        forged = await cloud.client.post(
            "/api/billing/stripe/webhook",
            content=json.dumps({"id": "evt_x"}),
            headers={"Stripe-Signature": "t=1,v1=00"},
        )
        assert forged.status_code == 400
        token = (await _token(cloud, owner, instance_id)).json()["token"]
        assert (await _refresh(cloud, instance_id, token)).status_code == 200
        assert (await cloud.client.get(f"/no/such/{instance_id}")).status_code == 404
        # Not on the public app: the metrics live on their own loopback listener only.
        assert (await cloud.client.get("/metrics")).status_code == 404

        after = await scrape(port)

    login = {"method": "POST", "route": "/api/auth/login"}
    assert after.value("quoroom_cp_http_requests_total", **login, status="401") == 1
    assert after.value("quoroom_cp_http_requests_total", **login, status="429") == 1
    assert after.value("quoroom_cp_http_requests_total", **login, status="200") == 2
    assert after.value("quoroom_cp_http_request_duration_seconds_count", **login) == 4
    for event, count in (("login_failed", 1), ("throttled", 1), ("login_ok", 2)):
        assert after.value("quoroom_cp_auth_events_total", event=event) == count, event
    assert after.value("quoroom_cp_auth_events_total", event="refresh_reuse") == 1
    assert after.value("quoroom_cp_refusals_total", code="invalid_credentials") == 1
    assert after.value("quoroom_cp_runtime_tokens_issued_total", kind="grant") == 1
    assert after.value("quoroom_cp_runtime_tokens_issued_total", kind="refresh") == 1
    assert after.value("quoroom_cp_stripe_webhooks_total", outcome="applied") == 2
    assert after.value("quoroom_cp_stripe_webhooks_total", outcome="invalid_signature") == 1
    assert after.value("quoroom_cp_stripe_webhook_lag_seconds_count") == 2
    assert after.value("quoroom_cp_instances", status="running") == 1
    assert after.value("quoroom_cp_worker_queue_depth") == 0
    token_route = "/api/cloud/instances/{instance_id}/runtime-token"
    assert (
        after.value(
            "quoroom_cp_http_requests_total", method="POST", route=token_route, status="200"
        )
        == 1
    )
    assert after.value(
        "quoroom_cp_http_requests_total", method="GET", route="unmatched", status="404"
    )
    # Bounded labels: no raw path, id or email in any label.
    for secret in (instance_id, owner.email, owner.user_id, "/no/such"):
        assert secret not in after.text


async def test_the_metrics_port_is_off_by_default_and_each_app_counts_alone(
    make_cloud: Any,
) -> None:
    async with make_cloud() as cloud, make_cloud() as other:
        assert (await cloud.client.get("/metrics")).status_code == 404
        await cloud.client.get("/healthz")
        one: Metrics = cloud.h.app.state.metrics
        two: Metrics = other.h.app.state.metrics
        labels = ("GET", "/healthz", "200")
        assert (
            one.registry.get_sample_value(
                "quoroom_cp_http_requests_total", dict(zip(("method", "route", "status"), labels))
            )
            == 1
        )
        assert (
            two.registry.get_sample_value(
                "quoroom_cp_http_requests_total",
                dict(zip(("method", "route", "status"), labels)),
            )
            is None
        )
        # Nothing listens unless the setting asks for it.
        assert cloud.h.services.core.settings.metrics_port is None
