"""Start-up wiring of billing: the catalog and the Stripe gateway, refused when half configured."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from control_plane.billing.service import build_billing
from control_plane.settings import Settings, SettingsError
from tests.fakes.stripe_api import DEFAULT_SECRET_KEY, DEFAULT_WEBHOOK_SECRET


async def test_production_needs_a_catalog_file(settings: Settings) -> None:
    production = settings.model_copy(update={"env": "production"})
    with pytest.raises(SettingsError) as caught:
        build_billing(production)
    assert caught.value.variable == "QUOROOM_CP_CATALOG_PATH"


async def test_production_refuses_to_start_without_stripe(make_settings: Any) -> None:
    with pytest.raises(ValueError, match="STRIPE_SECRET_KEY"):
        make_settings(
            env="production",
            public_url="https://cloud.example",
            smtp_url="smtps://smtp.example",
            secret_key="Zt4-Qm9vR2xLp7NcW0aYe8KdHs3Uf6JgBi1oXw5T",
            key_encryption_key="O45h8KnSxH4VtvgDmuLXxGAftZ6MKn0_TpCxxqWNfi8=",
        )


@pytest.mark.parametrize("missing", ["stripe_secret_key", "stripe_webhook_secret"])
async def test_half_a_stripe_configuration_is_refused(settings: Settings, missing: str) -> None:
    values = {
        "stripe_secret_key": SecretStr(DEFAULT_SECRET_KEY),
        "stripe_webhook_secret": SecretStr(DEFAULT_WEBHOOK_SECRET),
    }
    values[missing] = None  # type: ignore[assignment]
    with pytest.raises(SettingsError) as caught:
        build_billing(settings.model_copy(update=values))
    assert caught.value.variable == f"QUOROOM_CP_{missing.upper()}"
    assert DEFAULT_SECRET_KEY not in str(caught.value)


async def test_a_catalog_file_replaces_the_built_in_one(settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "catalog.json"
    path.write_text(
        json.dumps(
            {
                "tiers": [
                    {"id": "solo", "name": "Solo", "monthly_price_cents": 500,
                     "cpu_kind": "shared", "cpus": 1, "memory_mb": 512, "volume_gb": 1,
                     "stripe_price_id": "price_solo"}
                ],
                "regions": [{"id": "ams", "name": "Amsterdam"}],
            }
        )
    )  # fmt: skip
    billing = build_billing(settings.model_copy(update={"catalog_path": path}))
    assert [t.id for t in billing.catalog.tiers] == ["solo"]
    assert billing.enabled is False
    await billing.aclose()
