"""The typed services registry (control_plane/services.py): typed reads, once per type, frozen."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from control_plane.services import Core, Services
from control_plane.settings import Settings


class Thing:
    pass


class Other:
    pass


def _services() -> Services:
    core = Core(
        settings=Settings(),
        engine=None,  # type: ignore[arg-type]
        session_factory=None,  # type: ignore[arg-type]
        read_session_factory=None,  # type: ignore[arg-type]
        clock=lambda: datetime.now(UTC),
        wakeup=None,
    )
    return Services(core)


def test_a_context_is_found_by_its_type() -> None:
    services = _services()
    thing = Thing()
    services.provide(thing)
    services.freeze()
    assert services.get(Thing) is thing
    assert services.find(Other) is None


def test_a_missing_context_names_its_type() -> None:
    with pytest.raises(LookupError, match="no Other was provided"):
        _services().get(Other)


def test_each_type_is_provided_once_and_never_after_freezing() -> None:
    services = _services()
    services.provide(Thing())
    with pytest.raises(RuntimeError, match="Thing is already provided"):
        services.provide(Thing())
    services.freeze()
    with pytest.raises(RuntimeError, match="frozen"):
        services.provide(Other())
    with pytest.raises(AttributeError, match="frozen"):
        services.core = services.core


def test_a_value_can_stand_for_a_declared_kind() -> None:
    services = _services()

    class Special(Thing):
        pass

    special = Special()
    services.provide(special, kind=Thing)
    assert services.get(Thing) is special
