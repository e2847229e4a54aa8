"""Loading a run by store name, run file or ClickHouse URL: the one loader of show and compare."""

from __future__ import annotations

import os
from typing import Any, Callable

from renacerd.io.runfile import SUFFIX, GoldenError, read_golden
from renacerd.store.database import RunInfo, Store, StoreError, default_db_path
from renacerd.trace.effects import Effects
from renacerd.trace.unified_trace import UnifiedTrace


class LoadError(Exception):
    """The run cannot be loaded (one line: no such run, bad file, unreachable server)."""


def is_run_file(what: str) -> bool:
    """Whether `what` names a run file rather than a run in the store."""
    return os.path.isfile(what) or what.endswith(SUFFIX) or os.sep in what


class RunLoader:
    """Loads runs from the store at `db` (opened on first use), run files or ClickHouse."""

    def __init__(self, db: str | None) -> None:
        self.db = db
        self._store: Store | None = None

    def store(self) -> Store:
        """The store, opened for reading on first use."""
        if self._store is None:
            self._store = Store(self.db or default_db_path())
        return self._store

    def load(self, what: str, files: bool = True,
             check: Callable[[RunInfo], None] | None = None,
             ) -> tuple[RunInfo | dict[str, Any], list[UnifiedTrace]]:
        """(run info, traces) of `what`: a ClickHouse URL, a run file (when `files`) or a
        run name (`check` sees its row first and may refuse it); LoadError on one line."""
        from renacerd.io.clickhouse_source import is_clickhouse_url, load_run_info_from_url
        from renacerd.sinks import SinkError

        try:
            if is_clickhouse_url(what):  # before the path test: a URL contains '/'
                return load_run_info_from_url(what)
            if files and is_run_file(what):
                return read_golden(what)
            info = self.store().run(what)
            if check is not None:
                check(info)
            return info, self.store().load_run(what)
        except (SinkError, GoldenError, StoreError) as e:
            raise LoadError(str(e)) from None

    def aggregates(self, info: RunInfo | dict[str, Any]) -> dict[str, Any] | None:
        """A pruned stored run's aggregates (what its reports read instead of its events);
        None for a run that has its events or did not come from the store."""
        if not _reads_aggregates(info):
            return None
        try:
            return self.store().aggregates(info.id)
        except StoreError as e:
            raise LoadError(str(e)) from None

    def effects(self, info: RunInfo | dict[str, Any]) -> Effects | None:
        """A pruned stored run's effects as kept when it was pruned (compare's semantic
        part); None where they come from the run's events."""
        if not _reads_aggregates(info):
            return None
        try:
            items = self.store().stored_effects(info.id)  # type: ignore[union-attr]
        except StoreError as e:
            raise LoadError(str(e)) from None
        return None if items is None else Effects.from_items(items)


def _reads_aggregates(info: RunInfo | dict[str, Any]) -> bool:
    """Whether reports read the run's stored aggregates: a stored run pruned whole or by
    steps (one pruned while live, oldest chunks first, has none yet)."""
    return isinstance(info, RunInfo) and bool(info.pruned) and not (
        info.pruned.get("partial") and info.pruned.get("reason") == "live")
