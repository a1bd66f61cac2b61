"""What can be bought and where it runs: tiers (price, machine size, Stripe price) and regions.

The catalog is configuration: a JSON or TOML file (``load_catalog``) or the built-in default
(``default_catalog``). It is validated once, at start-up, so a bad entry stops the process with a
message that names the entry instead of failing at the first checkout.

File shape (TOML shown; JSON has the same keys)::

    [[tiers]]
    id = "starter"
    name = "Starter"
    monthly_price_cents = 900
    currency = "usd"
    cpu_kind = "shared"
    cpus = 1
    memory_mb = 1024
    volume_gb = 1
    stripe_price_id = "price_1Q..."

    [[regions]]
    id = "iad"
    name = "Ashburn, Virginia (US)"
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, model_validator

__all__ = [
    "Catalog",
    "CatalogError",
    "CpuKind",
    "Region",
    "Tier",
    "default_catalog",
    "load_catalog",
]

CpuKind = Literal["shared", "performance"]
_M = TypeVar("_M", bound=BaseModel)

# Fly Machines guest sizing: CPU counts are powers of two, memory comes in 256 MB steps, and the
# memory a CPU may carry depends on its kind (shared: 256 MB-2 GB per CPU; performance:
# 2-8 GB per CPU). A tier outside these bounds would only fail later, at machine creation, as a
# 400 from the Machines API, long after the customer has paid.
_ALLOWED_CPUS = frozenset({1, 2, 4, 8, 16})
_MEMORY_STEP_MB = 256
_MEMORY_PER_CPU_MB: Mapping[str, tuple[int, int]] = {
    "shared": (256, 2048),
    "performance": (2048, 8192),
}


class CatalogError(ValueError):
    """The catalog (a file or the values given) is invalid; the message names the entry."""


class Tier(BaseModel):
    """A purchasable size of Room: its monthly price, machine guest and volume, Stripe price."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(pattern=r"^[a-z][a-z0-9-]{0,31}$")
    name: str = Field(min_length=1, max_length=80)
    monthly_price_cents: PositiveInt
    currency: str = Field(default="usd", pattern=r"^[a-z]{3}$")
    cpu_kind: CpuKind
    cpus: PositiveInt
    memory_mb: PositiveInt
    volume_gb: PositiveInt
    stripe_price_id: str = Field(pattern=r"^price_[A-Za-z0-9_]+$", max_length=255)

    @model_validator(mode="after")
    def _fits_a_fly_guest(self) -> Tier:
        if self.cpus not in _ALLOWED_CPUS:
            raise ValueError(f"cpus must be one of {sorted(_ALLOWED_CPUS)}, not {self.cpus}")
        if self.memory_mb % _MEMORY_STEP_MB:
            raise ValueError(f"memory_mb must be a multiple of {_MEMORY_STEP_MB}")
        low, high = _MEMORY_PER_CPU_MB[self.cpu_kind]
        if not low * self.cpus <= self.memory_mb <= high * self.cpus:
            raise ValueError(
                f"memory_mb for {self.cpus} {self.cpu_kind} CPU(s) must be between "
                f"{low * self.cpus} and {high * self.cpus}, not {self.memory_mb}"
            )
        return self


class Region(BaseModel):
    """Where a Room can run: a Fly region code and a human name."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(pattern=r"^[a-z]{3}$")
    name: str = Field(min_length=1, max_length=80)


class Catalog:
    """The validated, immutable set of tiers and regions, with lookups by id and by price."""

    __slots__ = ("_regions", "_tiers", "_tiers_by_price")

    def __init__(self, tiers: Iterable[Tier], regions: Iterable[Region]) -> None:
        self._tiers: dict[str, Tier] = {}
        self._tiers_by_price: dict[str, Tier] = {}
        self._regions: dict[str, Region] = {}
        for index, tier in enumerate(tiers):
            where = f"tiers[{index}] ({tier.id!r})"
            if tier.id in self._tiers:
                raise CatalogError(f"{where}: duplicate tier id")
            if tier.stripe_price_id in self._tiers_by_price:
                other = self._tiers_by_price[tier.stripe_price_id].id
                raise CatalogError(
                    f"{where}: stripe_price_id {tier.stripe_price_id!r} is already used by "
                    f"tier {other!r}"
                )
            self._tiers[tier.id] = tier
            self._tiers_by_price[tier.stripe_price_id] = tier
        for index, region in enumerate(regions):
            if region.id in self._regions:
                raise CatalogError(f"regions[{index}] ({region.id!r}): duplicate region id")
            self._regions[region.id] = region
        if not self._tiers:
            raise CatalogError("the catalog has no tiers")
        if not self._regions:
            raise CatalogError("the catalog has no regions")

    @property
    def tiers(self) -> tuple[Tier, ...]:
        """Tiers in configuration order (the order a pricing page shows them)."""
        return tuple(self._tiers.values())

    @property
    def regions(self) -> tuple[Region, ...]:
        """Regions in configuration order."""
        return tuple(self._regions.values())

    def tier(self, tier_id: str) -> Tier:
        """The tier with this id; ``KeyError`` if there is none."""
        try:
            return self._tiers[tier_id]
        except KeyError:
            raise KeyError(f"unknown tier {tier_id!r}") from None

    def region(self, region_id: str) -> Region:
        """The region with this id; ``KeyError`` if there is none."""
        try:
            return self._regions[region_id]
        except KeyError:
            raise KeyError(f"unknown region {region_id!r}") from None

    def has_tier(self, tier_id: str) -> bool:
        return tier_id in self._tiers

    def has_region(self, region_id: str) -> bool:
        return region_id in self._regions

    def tier_for_price(self, stripe_price_id: str) -> Tier | None:
        """The tier sold under this Stripe price, if any (to read a subscription back)."""
        return self._tiers_by_price.get(stripe_price_id)

    def __repr__(self) -> str:
        return f"Catalog(tiers={list(self._tiers)}, regions={list(self._regions)})"

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, source: str = "catalog") -> Catalog:
        """Validate a decoded catalog document (``{"tiers": [...], "regions": [...]}``)."""
        if not isinstance(data, Mapping):
            raise CatalogError(f"{source}: expected a table/object at the top level")
        unknown = sorted(set(data) - {"tiers", "regions"})
        if unknown:
            raise CatalogError(f"{source}: unknown top-level key(s): {', '.join(unknown)}")
        tiers = [
            _validate_entry(Tier, "tiers", i, raw, source)
            for i, raw in _entries(data, "tiers", source)
        ]
        regions = [
            _validate_entry(Region, "regions", i, raw, source)
            for i, raw in _entries(data, "regions", source)
        ]
        try:
            return cls(tiers, regions)
        except CatalogError as exc:
            raise CatalogError(f"{source}: {exc}") from None


def _entries(data: Mapping[str, Any], key: str, source: str) -> Iterable[tuple[int, Any]]:
    entries = data.get(key)
    if entries is None:
        raise CatalogError(f"{source}: missing {key!r}")
    if not isinstance(entries, Sequence) or isinstance(entries, str | bytes):
        raise CatalogError(f"{source}: {key!r} must be a list")
    return enumerate(entries)


def _validate_entry(model: type[_M], key: str, index: int, raw: Any, source: str) -> _M:
    label = raw.get("id") if isinstance(raw, Mapping) else None
    where = f"{source}: {key}[{index}]" + (f" ({label!r})" if isinstance(label, str) else "")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'entry'}: {err['msg']}"
            for err in exc.errors(include_url=False)
        )
        raise CatalogError(f"{where}: {problems}") from None


def load_catalog(path: str | Path) -> Catalog:
    """Read and validate a catalog from a ``.json`` or ``.toml`` file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in {".json", ".toml"}:
        raise CatalogError(f"{path}: a catalog file must end in .json or .toml")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CatalogError(f"{path}: cannot read the catalog: {exc}") from exc
    try:
        data = json.loads(text) if suffix == ".json" else tomllib.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and TOMLDecodeError
        raise CatalogError(f"{path}: not valid {suffix[1:].upper()}: {exc}") from exc
    return Catalog.from_mapping(data, source=str(path))


def default_catalog() -> Catalog:
    """The built-in catalog (development and tests). Its price ids are placeholders: a
    deployment that takes payments configures its own file with real Stripe price ids."""
    return Catalog(
        tiers=[
            Tier(
                id="starter",
                name="Starter",
                monthly_price_cents=900,
                cpu_kind="shared",
                cpus=1,
                memory_mb=1024,
                volume_gb=1,
                stripe_price_id="price_quoroom_starter_monthly",
            ),
            Tier(
                id="standard",
                name="Standard",
                monthly_price_cents=1900,
                cpu_kind="shared",
                cpus=2,
                memory_mb=2048,
                volume_gb=5,
                stripe_price_id="price_quoroom_standard_monthly",
            ),
            Tier(
                id="pro",
                name="Pro",
                monthly_price_cents=4900,
                cpu_kind="performance",
                cpus=2,
                memory_mb=4096,
                volume_gb=10,
                stripe_price_id="price_quoroom_pro_monthly",
            ),
        ],
        regions=[
            Region(id="iad", name="Ashburn, Virginia (US)"),
            Region(id="ams", name="Amsterdam, Netherlands"),
            Region(id="fra", name="Frankfurt, Germany"),
            Region(id="sin", name="Singapore"),
            Region(id="syd", name="Sydney, Australia"),
        ],
    )
