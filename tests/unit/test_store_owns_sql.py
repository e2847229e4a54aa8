"""The store owns its schema: no SQL is handed to SQLite outside renacerd/store/."""

from __future__ import annotations

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "renacerd"
# A call that hands SQLite a statement: execute/executemany/executescript with a string
# literal that starts with an SQL keyword (or with an f-string), on any object.
SQL_CALL = re.compile(
    r"\.execute(?:many|script)?\(\s*f?[\"'](?:\s*)(SELECT|INSERT|UPDATE|DELETE|CREATE|DROP|"
    r"ALTER|REPLACE|BEGIN|COMMIT|ROLLBACK|PRAGMA|WITH)\b", re.IGNORECASE)


def _outside_store() -> list[Path]:
    return [p for p in sorted(PACKAGE.rglob("*.py")) if "store" not in p.relative_to(PACKAGE).parts]


def test_pattern_finds_sql_calls() -> None:
    """The patterns match the calls they are meant to catch (and the store has them)."""
    assert SQL_CALL.search('db.execute("SELECT id FROM runs")')
    assert SQL_CALL.search("self.db.execute(\n    f'DELETE FROM spans WHERE run_id=?')")
    assert not SQL_CALL.search('client.query("SELECT 1")')  # ClickHouse's own SQL is not ours
    assert SQL_CALL.search((PACKAGE / "store" / "readers.py").read_text())


def test_no_sql_outside_the_store() -> None:
    """Sinks, readers and the CLI call Store methods; the SQL is all in renacerd/store/."""
    found = []
    for path in _outside_store():
        text = path.read_text()
        for m in SQL_CALL.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            found.append(f"{path.relative_to(PACKAGE.parent)}:{line}")
    assert found == []
