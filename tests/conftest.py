import pytest


@pytest.fixture(autouse=True, scope="session")
def _npumoe_console():
    """npumoe's log records as the npumoe command shows them (`[npumoe] ...` on stderr or stdout):
    the tests read that output. Library users get plain logging (test_log.py)."""
    from npumoe_mlx.log import console

    console()
    yield
