"""CI's second pass keeps the tests that can reach Redis or PostgreSQL (tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from tests.conftest import _reads_backends


def _item(path: Path, *fixtures: str) -> Any:
    return SimpleNamespace(path=path, fixturenames=list(fixtures))


def test_a_test_with_a_backend_fixture_is_kept(tmp_path: Path) -> None:
    plain = tmp_path / "test_plain.py"
    plain.write_text("def test_x(make_harness): ...\n")
    for fixture in ("database_url", "redis_url", "migrated_database"):
        assert _reads_backends(_item(plain, "make_harness", fixture), {})
    assert not _reads_backends(_item(plain, "make_harness", "tmp_path"), {})


def test_a_module_that_reads_the_urls_itself_is_kept(tmp_path: Path) -> None:
    for text in (
        'URL = os.environ.get("QUOROOM_TEST_DATABASE_URL")\n',
        'URL = os.environ.get("QUOROOM_TEST_REDIS_URL")\n',
        "from tests.control_plane.conftest import PG_URL\n",
    ):
        module = tmp_path / "test_reads.py"
        module.write_text(text)
        assert _reads_backends(_item(module, "tmp_path"), {})


def test_the_real_suite_splits_as_expected() -> None:
    """The control plane's database tests stay; the runtime's own and the browser's go."""
    here = Path(__file__).parent
    sources: dict[Path, bool] = {}
    cp = here / "control_plane" / "auth" / "test_lockout.py"
    assert _reads_backends(_item(cp, "database_url"), sources)
    assert _reads_backends(_item(here / "runtime" / "test_ratelimit.py"), sources)
    assert not _reads_backends(_item(here / "runtime" / "test_gateway_real_room.py"), sources)
    assert not _reads_backends(_item(here / "browser" / "test_mobile_matrix.py"), sources)
