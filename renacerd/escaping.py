"""Captured strings are bytes on Linux and data, never markup: the one decoding and the
escaping every output uses.

Argv, paths, comm, environment values and run names are held as `str` decoded with
`surrogateescape` (Python's own convention for OS bytes, as os.fsdecode): a byte that is
not UTF-8 becomes one code point U+DC80..U+DCFF, so the bytes come back exactly
(`os.fsencode`). Such a string cannot be written as UTF-8, so every output passes it
through one of the functions here.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

_NAMED = {"\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def decode(b: bytes) -> str:
    """Captured bytes as a lossless str (undecodable bytes as surrogate escapes)."""
    return b.decode("utf-8", "surrogateescape")


def lossless_dumps(v: Any) -> bytes:
    """JSON for the store and the golden file, where nothing may be lost: strings holding
    bytes that are not UTF-8 as \\udcXX escapes (orjson refuses them both ways; the json
    module writes them and reads them back as the same str)."""
    try:
        return orjson.dumps(v)
    except TypeError:
        return json.dumps(v).encode()


def lossless_loads(text: str | bytes) -> Any:
    """What lossless_dumps wrote."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


def _char(ch: str) -> str:
    o = ord(ch)
    if ch in _NAMED:
        return _NAMED[ch]
    if 0xDC80 <= o <= 0xDCFF:  # a byte that is not UTF-8
        return f"\\x{o - 0xDC00:02x}"
    if ch.isprintable():
        return ch
    if o < 0x80:
        return f"\\x{o:02x}"
    # \u so that \x80..\xff always means a raw byte, never a C1 control character
    return f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}"


def escape(s: Any) -> str:
    """For any text output (terminal, text reports, HTML before its own escaping): a
    printable string as it is; otherwise each backslash, control or unprintable character
    written C-style (\\\\, \\n, \\x1b, \\u200b) and each byte that is not UTF-8 as \\xNN."""
    s = str(s)
    if s.isprintable() and "\\" not in s:
        return s
    return "".join(_char(ch) for ch in s)


def json_text(s: str) -> str:
    """For UTF-8 formats (JSON, exports, ClickHouse, OTLP): every character UTF-8 can carry
    as it is (the format escapes controls itself), each byte that is not UTF-8 as \\xNN."""
    if s.isascii():
        return s
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return "".join(
            f"\\x{ord(ch) - 0xDC00:02x}" if 0xDC80 <= ord(ch) <= 0xDCFF
            else f"\\u{ord(ch):04x}" if 0xD800 <= ord(ch) <= 0xDFFF else ch
            for ch in s
        )


def json_safe(obj: Any) -> Any:
    """`obj` with json_text applied to every string in it, dict keys included."""
    if isinstance(obj, str):
        return json_text(obj)
    if isinstance(obj, dict):
        return {json_safe(k) if isinstance(k, str) else k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj
