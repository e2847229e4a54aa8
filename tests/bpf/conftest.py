"""Every test here loads BPF programs into the kernel: each needs root (skipped otherwise,
and a skip fails under CI=true)."""

from __future__ import annotations

import pytest

from tests.conftest import needs_root


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the tests of this directory as needing root."""
    here = __file__.rsplit("/", 1)[0]
    for item in items:
        if str(item.fspath).startswith(here + "/"):
            item.add_marker(needs_root)
