"""Pair the paths of two runs that differ only in names: temp names, argv, run name, pids, dates.

The candidate's paths are rewritten into the baseline's names before effects are compared.
Two kinds of rule:
- prefix rules, applied to every candidate path: `--map OLD=NEW`, and absolute paths that
  differ between the two runs' command lines (argv of each process pair, by position);
- component renames, found by walking both runs' directory trees from the root: under a
  directory both runs have, a name only the candidate has pairs with a name only the baseline
  has when it is the same name up to a random temporary part (mkdtemp/mkstemp style), a
  date/time or UUID, a pid of a paired process, the run name, or a whole-component value
  that differs between the command lines. A pairing is made once and applies to that
  component everywhere in the run; a name that pairs with nothing stays a hard difference.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from renacerd.compare.pairing import ProcessPair
from renacerd.trace.effects import TMP_DIRS, Effects

PATH_KINDS = ("written", "created", "removed", "execs")
# endpoints that are paths: a unix socket in a per-run directory is named like a file
ENDPOINT_KINDS = ("connects", "net_sent", "net_recv")
UNIX = "unix:"
# what a generated temporary part is made of, and the shortest generator (mkstemp's XXXXXX)
_RANDOM_RUN = re.compile(r"[A-Za-z0-9_]+")
TEMP_MIN = 6
# a random part of at least TEMP_MIN characters differs in at least this many positions
# between two draws (all but ~1e-4 of the time): shorter differences are not temp names
TEMP_MIN_DIFF = 3
_DATE = re.compile(
    r"(?<!\d)(?:(?:19|20)\d{2}[-_]?(?:0[1-9]|1[0-2])[-_]?(?:0[1-9]|[12]\d|3[01])"
    r"(?:[T_-]?(?:[01]\d|2[0-3])[-:_.]?[0-5]\d(?:[-:_.]?[0-5]\d)?(?:[.,]\d{1,9})?)?"
    r"|1\d{9}(?:\d{3}){0,3}"  # epoch seconds, ms, us, ns
    r"|(?:[01]\d|2[0-3])[-:_.]?[0-5]\d[-:_.]?[0-5]\d)(?!\d)"
)
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_DIGITS = re.compile(r"(?<!\d)\d+(?!\d)")
MIN_PID = 2  # pid 1 is init: a "1" in a name is never taken for a pid


class MapError(ValueError):
    """A bad --map value (one line, exit 2)."""


@dataclass(frozen=True, slots=True)
class Rule:
    """One pairing as the report shows it: baseline name <-> candidate name, and why."""

    baseline: str
    candidate: str
    why: str
    tree: bool  # a directory: the rule covers everything under it (shown with /**)

    def line(self) -> str:
        """`/out/run-a/** ↔ /out/run-b/**` (or two plain paths for a single file)."""
        tail = "/**" if self.tree else ""
        return f"{self.baseline}{tail} \u2194 {self.candidate}{tail}"

    def to_json(self) -> dict:
        """The --json `path_map` entry."""
        return {"baseline": self.baseline + ("/**" if self.tree else ""),
                "candidate": self.candidate + ("/**" if self.tree else ""), "why": self.why}


def parse_map(value: str) -> tuple[str, str]:
    """`OLD=NEW` (baseline path = candidate path, both absolute; `/**` tails allowed)."""
    if value.count("=/") != 1 or not value.startswith("/"):
        raise MapError(f"--map needs OLD=NEW with two absolute paths, not {value!r}")
    old, new = value.split("=/")
    old, new = _strip_glob(old), _strip_glob("/" + new)
    if not old or not new or old == new:
        raise MapError(f"--map needs two different paths, not {value!r}")
    return old, new


def _strip_glob(p: str) -> str:
    p = p[:-3] if p.endswith("/**") else p
    return p.rstrip("/") or "/"


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix.rstrip("/") + "/")


@dataclass(slots=True)
class PathMap:
    """Candidate path -> baseline path, and the rules that did it."""

    prefixes: list[tuple[str, str, str]] = field(default_factory=list)  # (cand, base, why)
    renames: dict[str, str] = field(default_factory=dict)  # candidate component -> baseline
    rules: list[Rule] = field(default_factory=list)

    def apply(self, path: str) -> str:
        """The candidate's `path` in the baseline's names."""
        if not path.startswith("/"):
            return path
        for cand, base, _ in self.prefixes:
            if _under(path, cand):
                path = base + path[len(cand):]
                break
        if self.renames:
            path = "/".join(self.renames.get(c, c) for c in path.split("/"))
        return path

    def apply_effects(self, e: Effects) -> Effects:
        """A copy of the candidate's effects keyed by baseline names."""
        out = Effects(**{k: getattr(e, k).copy() for k in Effects.__slots__})
        for kind in PATH_KINDS + ENDPOINT_KINDS:
            old = getattr(e, kind)
            new = getattr(out, kind)
            new.clear()
            for k, v in old.items():
                new[self._key(kind, k)] += v
        return out

    def _key(self, kind: str, k: str) -> str:
        if kind in PATH_KINDS:
            return self.apply(k)
        return UNIX + self.apply(k[len(UNIX):]) if k.startswith(UNIX) else k

    def lines(self) -> list[str]:
        """The report's mapping lines."""
        return [r.line() for r in self.rules]


def _paths(e: Effects) -> list[str]:
    """Absolute paths of a run's effects, in first-seen order."""
    seen: dict[str, None] = {}
    for kind in PATH_KINDS + ENDPOINT_KINDS:
        for k in getattr(e, kind):
            if kind in ENDPOINT_KINDS:
                k = k[len(UNIX):] if k.startswith(UNIX) else ""
            if k.startswith("/"):
                seen.setdefault(k, None)
    return list(seen)


class _Tree:
    """Children of each directory (ordered by first appearance) and which are directories."""

    def __init__(self, paths: Iterable[str]) -> None:
        self.kids: dict[str, dict[str, None]] = {}
        self.dirs: set[str] = set()
        for p in paths:
            parts = p.split("/")
            for i in range(1, len(parts)):
                parent = "/".join(parts[:i]) or "/"
                self.kids.setdefault(parent, {}).setdefault(parts[i], None)
                if i < len(parts) - 1:
                    self.dirs.add(_join(parent, parts[i]))


def _join(parent: str, name: str) -> str:
    return f"/{name}" if parent == "/" else f"{parent}/{name}"


def _is_temp_pair(c: str, b: str, in_tmp: bool) -> bool:
    """Same name but for one generated part (mkdtemp/mkstemp/tempfile style)."""
    if len(c) != len(b) or c == b:
        return False
    n = len(c)
    p = 0
    while c[p] == b[p]:
        p += 1
    s = 0
    while s < n - p and c[n - 1 - s] == b[n - 1 - s]:
        s += 1
    lo, hi = p, n - s
    if hi - lo < TEMP_MIN_DIFF:
        return False
    for name in (c, b):
        run = next((m for m in _RANDOM_RUN.finditer(name) if m.start() <= lo and hi <= m.end()),
                   None)
        if run is None or run.end() - run.start() < TEMP_MIN:
            return False
    dc, db = c[lo:hi], b[lo:hi]
    if dc.isdigit() and db.isdigit():
        return False  # counters, step numbers: a real difference unless a date or pid
    return in_tmp or _randomish(dc) or _randomish(db)


def _randomish(s: str) -> bool:
    """Looks generated: mixes digits and letters, or upper and lower case."""
    d = any(ch.isdigit() for ch in s)
    lo = any(ch.islower() for ch in s)
    up = any(ch.isupper() for ch in s)
    return (d and (lo or up)) or (lo and up)


def _masked(s: str) -> str:
    return _DATE.sub("<date>", _UUID.sub("<uuid>", s))


def _is_date_pair(c: str, b: str) -> bool:
    """Same name but for dates, times, epoch stamps or UUIDs."""
    mc = _masked(c)
    return mc != c and mc == _masked(b)


def _tmp_dirs() -> tuple[str, ...]:
    tmp = os.environ.get("TMPDIR", "").rstrip("/")
    return tuple(d.rstrip("/") for d in TMP_DIRS) + ((tmp,) if tmp else ())


@dataclass(slots=True)
class _Hints:
    """What the runs' metadata says differs: whole-component values, pids, run names."""

    tokens: dict[str, str] = field(default_factory=dict)  # candidate component -> baseline
    pids: dict[str, str] = field(default_factory=dict)    # candidate pid -> baseline pid
    run: tuple[str, str] | None = None                     # (baseline, candidate) run names

    def transform(self, c: str) -> tuple[str, str] | None:
        """The name `c` would have in the baseline by one of the hints, and which."""
        if c in self.tokens:
            return self.tokens[c], "argv"
        if self.pids:
            out = _DIGITS.sub(lambda m: self.pids.get(m.group(), m.group()), c)
            if out != c:
                return out, "pid"
        if self.run and self.run[1] in c:
            return c.replace(self.run[1], self.run[0]), "run name"
        return None


def _argv_rules(pairs: list[ProcessPair], pm: PathMap, hints: _Hints) -> None:
    """Absolute paths that differ between paired command lines become prefix rules; other
    differing whole components become rename hints."""
    seen: set[tuple[str, str]] = {(c, b) for c, b, _ in pm.prefixes}
    for p in pairs:
        if p.baseline is None or p.candidate is None:
            continue
        ab, ac = p.baseline.process.argv, p.candidate.process.argv
        if len(ab) != len(ac):
            continue
        for vb, vc in zip(ab, ac):
            if vb == vc:
                continue
            kb, sep, rb = vb.partition("=")
            kc, _, rc = vc.partition("=")
            if sep and kb == kc and "/" not in kb:
                vb, vc = rb, rc  # --out=/dir: the value
            rule = _differing_prefix(vb, vc)
            if rule is not None:
                if rule not in seen:
                    seen.add(rule)
                    pm.prefixes.append((rule[0], rule[1], "argv"))
                continue
            for xb, xc in _differing_components(vb, vc):
                hints.tokens.setdefault(xc, xb)


def _differing_prefix(vb: str, vc: str) -> tuple[str, str] | None:
    """(candidate prefix, baseline prefix) for two absolute paths: up to the last component
    that differs (their common tail stays under it)."""
    if not (vb.startswith("/") and vc.startswith("/")):
        return None
    b, c = vb.rstrip("/").split("/"), vc.rstrip("/").split("/")
    k = 0
    while k < min(len(b), len(c)) and b[-1 - k] == c[-1 - k]:
        k += 1
    pb, pc = "/".join(b[: len(b) - k]), "/".join(c[: len(c) - k])
    if not pb or not pc or pb == pc:
        return None
    return pc, pb


def _differing_components(vb: str, vc: str) -> list[tuple[str, str]]:
    """Components that differ position by position between two values of one argument."""
    b, c = vb.split("/"), vc.split("/")
    if len(b) != len(c):
        return []
    return [(x, y) for x, y in zip(b, c) if x != y and x and y]


def infer_path_map(base: Effects, cand: Effects, pairs: list[ProcessPair],
                   user: Iterable[tuple[str, str]] = (),
                   run_names: tuple[str | None, str | None] = (None, None)) -> PathMap:
    """The PathMap taking the candidate's paths to the baseline's (see the module doc)."""
    pm = PathMap()
    for old, new in user:
        pm.prefixes.append((new, old, "--map"))
    hints = _Hints()
    _argv_rules(pairs, pm, hints)
    # longest candidate prefix first: a deeper rule wins over a shallower one
    pm.prefixes.sort(key=lambda r: -len(r[0]))
    for p in pairs:
        if p.baseline is not None and p.candidate is not None:
            b, c = p.baseline.pid, p.candidate.pid
            if b != c and min(b, c) >= MIN_PID:
                hints.pids[str(c)] = str(b)
    rb, rc = run_names
    if rb and rc and rb != rc:
        hints.run = (rb, rc)
    cand_paths = _paths(cand)
    used: set[int] = set()
    mapped = []
    for path in cand_paths:
        for i, (pc, pb, _) in enumerate(pm.prefixes):
            if _under(path, pc):
                used.add(i)
                path = pb + path[len(pc):]
                break
        mapped.append(path)
    tb, tc = _Tree(_paths(base)), _Tree(mapped)
    for i, (pc, pb, why) in enumerate(pm.prefixes):
        if i in used:
            pm.rules.append(Rule(pb, pc, why, pb in tb.dirs or pc in tc.dirs or
                                 any(p != pc and _under(p, pc) for p in cand_paths)))
    _walk(tb, tc, hints, pm)
    return pm


def _walk(tb: _Tree, tc: _Tree, hints: _Hints, pm: PathMap) -> None:
    """Breadth-first from the root over directories both runs have, pairing unmatched names."""
    tmp = _tmp_dirs()
    queue = [("/", "/")]
    while queue:
        bdir, cdir = queue.pop(0)
        bk, ck = tb.kids.get(bdir, {}), tc.kids.get(cdir, {})
        free_b = [n for n in bk if n not in ck]
        in_tmp = any(_under(bdir, d) for d in tmp)
        for name in ck:
            target = pm.renames.get(name)
            why = None
            if target is None and name not in bk:
                hit = hints.transform(name)
                if hit is not None and hit[0] in free_b:
                    target, why = hit
                else:
                    target = next((b for b in free_b if _is_date_pair(name, b)), None)
                    why = "date" if target is not None else None
                    if target is None:
                        target = next((b for b in free_b if _is_temp_pair(name, b, in_tmp)),
                                      None)
                        why = "temp name"
                if target is not None:
                    pm.renames[name] = target
                    free_b.remove(target)
                    bpath, cpath = _join(bdir, target), _join(cdir, name)
                    pm.rules.append(Rule(bpath, cpath, why or "",
                                         bpath in tb.dirs or cpath in tc.dirs))
            bname = target or name
            bpath, cpath = _join(bdir, bname), _join(cdir, name)
            if bpath in tb.dirs and cpath in tc.dirs:
                queue.append((bpath, cpath))
