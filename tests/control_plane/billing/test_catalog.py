"""The catalog: built-in defaults, lookups, validation and catalog files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from control_plane.billing.catalog import (
    Catalog,
    CatalogError,
    Region,
    Tier,
    default_catalog,
    load_catalog,
)


def tier(**overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "id": "starter",
        "name": "Starter",
        "monthly_price_cents": 900,
        "currency": "usd",
        "cpu_kind": "shared",
        "cpus": 1,
        "memory_mb": 1024,
        "volume_gb": 1,
        "stripe_price_id": "price_starter",
    }
    values.update(overrides)
    return values


def document(tiers: list[dict[str, Any]] | None = None, **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "tiers": tiers if tiers is not None else [tier()],
        "regions": [{"id": "iad", "name": "Ashburn"}],
    }
    doc.update(extra)
    return doc


def test_the_default_catalog_offers_three_tiers_in_five_regions() -> None:
    catalog = default_catalog()

    assert [t.id for t in catalog.tiers] == ["starter", "standard", "pro"]
    assert [r.id for r in catalog.regions] == ["iad", "ams", "fra", "sin", "syd"]
    pro = catalog.tier("pro")
    assert (pro.cpu_kind, pro.cpus, pro.memory_mb, pro.volume_gb) == ("performance", 2, 4096, 10)
    assert catalog.region("fra").name == "Frankfurt, Germany"


def test_a_tier_is_found_by_its_stripe_price() -> None:
    catalog = default_catalog()

    assert catalog.tier_for_price("price_quoroom_standard_monthly") == catalog.tier("standard")
    assert catalog.tier_for_price("price_unknown") is None


def test_unknown_tiers_and_regions_raise_key_errors_naming_them() -> None:
    catalog = default_catalog()

    with pytest.raises(KeyError, match="gold"):
        catalog.tier("gold")
    with pytest.raises(KeyError, match="lhr"):
        catalog.region("lhr")
    assert not catalog.has_tier("gold")
    assert catalog.has_region("iad")


def test_tiers_and_regions_are_immutable() -> None:
    starter = default_catalog().tier("starter")

    with pytest.raises(ValidationError):
        starter.cpus = 8


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"cpu_kind": "dedicated"}, "cpu_kind"),
        ({"monthly_price_cents": 0}, "monthly_price_cents"),
        ({"memory_mb": -1}, "memory_mb"),
        ({"volume_gb": 0}, "volume_gb"),
        ({"cpus": 3}, "cpus must be one of"),
        ({"memory_mb": 1000}, "multiple of 256"),
        ({"memory_mb": 4096}, "between 256 and 2048"),
        ({"cpu_kind": "performance", "memory_mb": 1024}, "between 2048 and 8192"),
        ({"stripe_price_id": "prod_123"}, "stripe_price_id"),
        ({"currency": "USD"}, "currency"),
        ({"id": "Has Spaces"}, "id"),
        ({"surprise": True}, "surprise"),
    ],
)
def test_an_invalid_tier_entry_is_refused_with_its_index_id_and_field(
    overrides: dict[str, Any], fragment: str
) -> None:
    doc = document([tier(), tier(**{"id": "broken", "stripe_price_id": "price_b", **overrides})])

    with pytest.raises(CatalogError) as caught:
        Catalog.from_mapping(doc, source="cat.json")

    message = str(caught.value)
    assert message.startswith("cat.json: tiers[1] (")
    assert fragment in message


def test_duplicate_tier_ids_are_refused() -> None:
    with pytest.raises(CatalogError, match=r"tiers\[1\] \('starter'\): duplicate tier id"):
        Catalog.from_mapping(document([tier(), tier(stripe_price_id="price_other")]))


def test_two_tiers_sold_under_one_stripe_price_are_refused() -> None:
    with pytest.raises(CatalogError, match="already used by tier 'starter'"):
        Catalog.from_mapping(document([tier(), tier(id="other")]))


def test_duplicate_regions_are_refused() -> None:
    doc = document()
    doc["regions"].append({"id": "iad", "name": "Again"})

    with pytest.raises(CatalogError, match=r"regions\[1\] \('iad'\): duplicate region id"):
        Catalog.from_mapping(doc)


@pytest.mark.parametrize(
    ("doc", "fragment"),
    [
        ({"regions": [{"id": "iad", "name": "A"}]}, "missing 'tiers'"),
        (document([]), "no tiers"),
        (document(regions=[]), "no regions"),
        (document(tiers=None, extra=1), "unknown top-level key(s): extra"),
        (document(regions="iad"), "'regions' must be a list"),
        ([], "top level"),
    ],
)
def test_a_malformed_catalog_document_is_refused(doc: Any, fragment: str) -> None:
    with pytest.raises(CatalogError) as caught:
        Catalog.from_mapping(doc)

    assert fragment in str(caught.value)


def test_a_json_catalog_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps(document()), encoding="utf-8")

    catalog = load_catalog(path)

    assert catalog.tiers == (Tier(**tier()),)
    assert catalog.regions == (Region(id="iad", name="Ashburn"),)


def test_a_toml_catalog_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "catalog.toml"
    path.write_text(
        """
[[tiers]]
id = "starter"
name = "Starter"
monthly_price_cents = 900
cpu_kind = "shared"
cpus = 1
memory_mb = 1024
volume_gb = 1
stripe_price_id = "price_1Qabc"

[[regions]]
id = "ams"
name = "Amsterdam"
""",
        encoding="utf-8",
    )

    catalog = load_catalog(path)

    assert catalog.tier("starter").currency == "usd"
    assert catalog.tier("starter").stripe_price_id == "price_1Qabc"
    assert catalog.region("ams").name == "Amsterdam"


def test_a_bad_entry_in_a_file_is_reported_with_the_file_and_entry(tmp_path: Path) -> None:
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps(document([tier(cpu_kind="gpu")])), encoding="utf-8")

    with pytest.raises(CatalogError) as caught:
        load_catalog(path)

    assert str(caught.value).startswith(f"{path}: tiers[0] ('starter'): cpu_kind:")


@pytest.mark.parametrize(
    ("name", "content", "fragment"),
    [
        ("catalog.json", "{not json", "not valid JSON"),
        ("catalog.toml", "tiers = [", "not valid TOML"),
        ("catalog.yaml", "tiers: []", "must end in .json or .toml"),
    ],
)
def test_an_unreadable_catalog_file_is_refused_with_a_clear_error(
    tmp_path: Path, name: str, content: str, fragment: str
) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")

    with pytest.raises(CatalogError, match=fragment):
        load_catalog(path)


def test_a_missing_catalog_file_is_refused_naming_the_path(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"

    with pytest.raises(CatalogError, match="cannot read"):
        load_catalog(path)
