"""`renacer gc`: one retention pass over the store (what the service does every minute)."""

from __future__ import annotations

import os
import sys

from renacerd.cli.common import Parser, add_db, fail
from renacerd.escaping import escape

PROG = "renacer gc"


def add_retention(p: Parser, defaults: bool) -> None:
    """--retention-size and --retention-time (`defaults`: the service's, in the help)."""
    size = " (default 10%% of the store's file system)" if defaults else ""
    age = " (default 30d)" if defaults else ""
    p.add_argument("--retention-size", metavar="SIZE",
                   help=f"keep the store (file and WAL) under SIZE: 500M, 2G or 10%%{size}")
    p.add_argument("--retention-time", metavar="DURATION",
                   help=f"drop the events of runs that ended longer ago: 30d, 12h{age}")
    p.add_argument("--keep-steps", metavar="N", type=int,
                   help="in each ended run, keep full events only for the first and last N "
                        "steps, those show --by step flags as anomalous and a sample of N "
                        "others (the rest keep their aggregates)")


def _steps_of(info, traces) -> list:
    """The steps of a run and their outlier flags, as `renacer show --by step` has them."""
    from renacerd.reports.steps import steps_data

    return steps_data(info, traces)["steps"]


def policy_of(size: str | None, age: str | None, db: str, keep_steps: int | None = None):
    """The Policy of the options; RetentionError on a bad value."""
    from renacerd.store.retention import Policy, RetentionError, parse_duration, parse_size

    if keep_steps is not None and keep_steps < 0:
        raise RetentionError(f"--keep-steps must be 0 or more, not {keep_steps}")
    return Policy(size=parse_size(size, db) if size is not None else None,
                  age_ns=parse_duration(age) if age is not None else None,
                  keep_steps=keep_steps, steps_of=_steps_of if keep_steps is not None else None)


def main(argv: list[str]) -> int:
    """Entry point."""
    p = Parser(prog=PROG, description="Prune the oldest runs' events (metadata, spans and "
               "per-step aggregates are kept) until the store fits its budgets. Without "
               "budgets: the service's defaults, 10%% of the file system and 30d.")
    add_db(p)
    add_retention(p, defaults=True)
    p.add_argument("--dry-run", action="store_true", help="say what would be pruned, "
                   "change nothing")
    a = p.parse_args(argv)
    from renacerd.store.database import Store, StoreError, default_db_path
    from renacerd.store.retention import (
        DEFAULT_SIZE,
        DEFAULT_TIME,
        Retention,
        RetentionError,
        store_size,
    )

    db = a.db or default_db_path()
    if a.retention_size is None and a.retention_time is None and a.keep_steps is None:
        a.retention_size, a.retention_time = DEFAULT_SIZE, DEFAULT_TIME
    try:
        policy = policy_of(a.retention_size, a.retention_time, db, a.keep_steps)
    except RetentionError as e:
        return fail(PROG, str(e))
    if not os.path.exists(db):
        return fail(PROG, f"no store at {db}")
    verb = "would prune" if a.dry_run else "pruned"

    def say(act) -> None:
        # as each run is done: what a pass killed midway had finished is on the screen
        sys.stdout.write(f"{verb} {escape(act.run)} ({act.reason}): {act.chunks} chunks, "
                         f"{act.events} events, {act.bytes} bytes\n")
        sys.stdout.flush()

    try:
        # a dry run only reads; a pass upgrades an older store in place first
        store = Store(db, create=not a.dry_run)
        ret = Retention(store)
        before = store_size(db)
        actions = ret.apply(policy, dry_run=a.dry_run, on_action=say)
        for act in actions:
            if act.reason == "live":
                say(act)
        converted = False if a.dry_run else ret.enable_incremental()
        after = store_size(db)
        store.close()
    except StoreError as e:
        return fail(PROG, str(e))
    w = sys.stdout.write
    if converted:
        w("store rewritten once to return free pages from now on (auto_vacuum)\n")
    budget = f", budget {policy.size}" if policy.size is not None else ""
    if a.dry_run:
        w(f"{len(actions)} run(s) would be pruned; store {before} bytes{budget}\n")
    else:
        w(f"{len(actions)} run(s) pruned; store {before} -> {after} bytes{budget}\n")
    return 0
