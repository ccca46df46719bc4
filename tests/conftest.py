"""Shared fixtures.

Prefect: one temporary Prefect server for the whole test session, started only when a test
requests the `prefect_harness` fixture (so test runs without Prefect tests never start it).
Prefect reads its home folder when it is first imported, so PREFECT_HOME (a private temporary
folder) and the analytics switch are set here, before any test module imports Prefect.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

_PREFECT_HOME = tempfile.mkdtemp(prefix="cmkd-test-prefect-home-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.pop("PREFECT_API_URL", None)  # never talk to a user's real server from tests


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_PREFECT_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary Prefect server (and database) shared by every Prefect test."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield
