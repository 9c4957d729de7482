"""Run against a live berth whose model is berth's mock (started by
`crates/berth-cli/tests/sdk_clients.rs`, which passes BERTH_URL, BERTH_TOKEN and
BERTH_TEST_REAL_KEY)."""

import os

import pytest

from berth import Berth


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="session")
def api() -> Berth:
    for k in ("BERTH_URL", "BERTH_TOKEN", "BERTH_TEST_REAL_KEY"):
        assert os.environ.get(k), f"{k} must be set (run through the berth-cli sdk_clients test)"
    return Berth()


@pytest.fixture
def box(api: Berth):
    """A persistent box of the test's own (its files outlive the session), destroyed after."""
    b = api.create_box({"lifecycle": "persistent", "resources": {"memory_mib": 1024, "disk_mib": 256}})
    yield b["id"]
    api.delete_box(b["id"])


@pytest.fixture(scope="session")
def real_key() -> str:
    return os.environ["BERTH_TEST_REAL_KEY"]
