"""`renacer rm RUN...`: delete runs from the store, everything they recorded."""

from __future__ import annotations

import os
import sys

from renacerd.cli.common import Parser, add_db, fail
from renacerd.escaping import escape

PROG = "renacer rm"


def main(argv: list[str]) -> int:
    """Entry point."""
    p = Parser(prog=PROG, description="Delete runs entirely. In a store another user owns "
               "(the service's), only a run's owner or root may.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run name")
    add_db(p)
    a = p.parse_args(argv)
    from renacerd.store.database import Store, StoreError, default_db_path
    from renacerd.store.retention import Retention

    db = a.db or default_db_path()
    try:
        if not os.path.exists(db):
            return fail(PROG, f"no store at {db}")
        store = Store(db)
        infos = [store.run(name) for name in dict.fromkeys(a.runs)]
        me = os.geteuid()
        shared = os.stat(db).st_uid != me
        for info in infos:
            # the file's owner (the user's own store) may remove anything in it
            if me != 0 and shared and info.owner_uid != me:
                return fail(PROG, f"run '{escape(info.name)}' belongs to uid "
                            f"{info.owner_uid}: only its owner or root may remove it")
            if info.status == "running":
                return fail(PROG, f"run '{escape(info.name)}' is still running")
        store.close()
        store = Store(db, create=True)  # an older store is upgraded before the write
        ret = Retention(store)
        for info in infos:
            ret.delete_run(store.run(info.name))
            sys.stdout.write(f"removed {escape(info.name)}\n")
        ret.reclaim()
        store.close()
    except StoreError as e:
        return fail(PROG, str(e))
    return 0
