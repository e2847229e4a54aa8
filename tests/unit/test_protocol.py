"""Wire protocol: round trips, and every class of bad frame gets ProtocolError with its kind."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from renacerd.client.protocol import (
    MAX_FRAME,
    MAX_METRICS,
    PROTOCOL_VERSION,
    Ack,
    Dropped,
    Hello,
    ProtocolError,
    Ring,
    SpanEnd,
    SpanSet,
    SpanStart,
    TraceMe,
    decode,
    encode,
)
from renacerd.experiment_span import ExperimentMetadata, SpanType, StatusCode

SPAN = "00f067aa0ba902b7"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
MD = ExperimentMetadata("gpt-2", 1, 10, 0.5, {"acc": 0.9, "ppl": 12.0})

MESSAGES = [
    Hello(PROTOCOL_VERSION, 1234, "llama-ft", "renacerd.client.core/1"),
    Hello(),
    SpanStart(SPAN, TRACE, None, "training_step", SpanType.EXPERIMENT, MD, 10, 20, 30, 40),
    SpanStart(SPAN, TRACE, "0000000000000001", "s", SpanType.GPU, ExperimentMetadata(), 0, 0,
              0, 0),
    SpanSet(SPAN, ExperimentMetadata(loss=0.25, metrics={"acc": 1.0}),
            frozenset({"loss", "metrics"})),
    SpanEnd(SPAN, StatusCode.ERROR, "boom", "RuntimeError", 11, 21, 41),
    SpanEnd(SPAN, StatusCode.OK, "", None, 11, 21, 41),
    Dropped(17),
    TraceMe(1, "run-1"),
    TraceMe(2, None),
    TraceMe(3, "run-3", from_exec=True),
    Ack(1, True, ""),
    Ack(2, False, "not yours"),
    Ring(1 << 21, False),
    Ring(1 << 16, True),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(msg):
    assert decode(encode(msg)) == msg


@pytest.mark.parametrize("msg", [MESSAGES[2], MESSAGES[6],
                                 SpanStart(SPAN, TRACE, "0000000000000001", "s",
                                           SpanType.EXPERIMENT, ExperimentMetadata(), 0, 0, 0,
                                           0),
                                 SpanStart(SPAN, TRACE, None, "s", SpanType.EXPERIMENT,
                                           ExperimentMetadata("m", None, 2**64 - 1, None,
                                                              {"i": 3.0}), 1, 2, 3, 4)],
                         ids=["start", "end", "start-parent", "start-int-metric"])
def test_compact_round_trip(msg):
    frame = encode(msg, compact=True)
    assert frame.startswith(b"[")
    assert decode(frame) == msg


def compact_start(**changes):
    fields = ["t", "span", "trace", "parent", "name", "model_name", "epoch", "step", "loss",
              "metrics", "mono", "wall", "tid", "lc"]
    arr = MESSAGES[2].to_compact()
    for key, value in changes.items():
        arr[fields.index(key)] = value
    return orjson.dumps(arr)


def start(**changes):
    obj = orjson.loads(encode(MESSAGES[2]))
    obj.update(changes)
    return orjson.dumps(obj)


def with_md(**md):
    obj = orjson.loads(encode(MESSAGES[2]))
    obj["md"].update(md)
    return orjson.dumps(obj)


def without(key):
    obj = orjson.loads(encode(MESSAGES[2]))
    del obj[key]
    return orjson.dumps(obj)


BAD = [
    ("empty", b"", "empty"),
    ("oversized", b" " * (MAX_FRAME + 1), "oversized"),
    ("garbage", b"\x00\xff\xfe garbage", "malformed"),
    ("truncated", encode(MESSAGES[2])[:-7], "malformed"),
    ("nan literal", b'{"t":"dropped","n":NaN}', "malformed"),
    ("infinite number", b'{"t":"dropped","n":1e999}', "malformed"),
    ("not an object", b"[1,2,3]", "schema"),
    ("no type", b'{"n": 1}', "schema"),
    ("unknown type", b'{"t": "exec", "cmd": "rm -rf /"}', "schema"),
    ("unhashable type", b'{"t": ["span_start"]}', "schema"),
    ("old version", orjson.dumps({"t": "hello", "v": 1, "pid": 1}), "version"),
    ("newer version", orjson.dumps({"t": "hello", "v": 3, "pid": 1}), "version"),
    ("version as string", orjson.dumps({"t": "hello", "v": "1", "pid": 1}), "schema"),
    ("missing field", without("mono"), "schema"),
    ("span id wrong type", start(span=123), "value"),
    ("span id uppercase", start(span=SPAN.upper()), "value"),
    ("span id zero", start(span="0" * 16), "value"),
    ("trace id short", start(trace=TRACE[:-1]), "value"),
    ("trace id zero", start(trace="0" * 32), "value"),
    ("negative time", start(mono=-1), "value"),
    ("float time", start(mono=1.5), "schema"),
    ("bool time", start(mono=True), "schema"),
    ("huge int", start().replace(b'"wall":20', b'"wall":18446744073709551616'), "schema"),
    ("unknown kind", start(kind="cpu"), "value"),
    ("unhashable kind", start(kind={}), "value"),
    ("name not a string", start(name=7), "schema"),
    ("name too long", start(name="x" * 257), "limit"),
    ("md not an object", start(md=[]), "schema"),
    ("metric string", with_md(metrics={"acc": "high"}), "value"),
    ("metric null (non-finite on the wire)", with_md(metrics={"acc": None}), "value"),
    ("metric bool", with_md(metrics={"acc": True}), "value"),
    ("huge metric map", with_md(metrics={f"m{i}": 1.0 for i in range(MAX_METRICS + 1)}),
     "limit"),
    ("metric name too long", with_md(metrics={"m" * 129: 1.0}), "limit"),
    ("model name too long", with_md(model_name="m" * 257), "limit"),
    ("negative epoch", with_md(epoch=-1), "value"),
    ("epoch too big", with_md(epoch=2**32), "value"),
    ("loss string", with_md(loss="0.1"), "value"),
    ("bad status", orjson.dumps({"t": "span_end", "span": SPAN, "status": "fine", "mono": 1,
                                 "wall": 1, "lc": 1}), "value"),
    ("bad run name", orjson.dumps({"t": "trace_me", "req": 1, "run": "../../etc"}), "value"),
    ("ack ok not bool", orjson.dumps({"t": "ack", "req": 1, "ok": 1}), "schema"),
    ("dropped negative", orjson.dumps({"t": "dropped", "n": -3}), "value"),
    ("ring size not a power of two", orjson.dumps({"t": "ring", "size": 3 << 16, "crc": True}),
     "value"),
    ("ring too small", orjson.dumps({"t": "ring", "size": 1 << 12, "crc": True}), "value"),
    ("ring too big", orjson.dumps({"t": "ring", "size": 1 << 27, "crc": True}), "value"),
    ("ring crc not bool", orjson.dumps({"t": "ring", "size": 1 << 16, "crc": 1}), "schema"),
    ("empty array", b"[]", "schema"),
    ("array of unknown tag", b'["x", 1, 2, 3, 4]', "schema"),
    ("compact start too short", orjson.dumps(MESSAGES[2].to_compact()[:-1]), "schema"),
    ("compact end too long", orjson.dumps(MESSAGES[6].to_compact() + [1]), "schema"),
    ("compact start zero span", compact_start(span="0" * 16), "value"),
    ("compact start bad trace", compact_start(trace="x" * 32), "value"),
    ("compact start metric null", compact_start(metrics={"acc": None}), "value"),
    ("compact start metric bool", compact_start(metrics={"acc": True}), "value"),
    ("compact start negative time", compact_start(mono=-1), "value"),
    ("compact start name too long", compact_start(name="x" * 257), "limit"),
    ("compact end bad span", orjson.dumps(["e", "zz", 1, 2, 3]), "value"),
    ("compact end float time", orjson.dumps(["e", SPAN, 1.5, 2, 3]), "schema"),
]


@pytest.mark.parametrize(("frame", "kind"), [(f, k) for _, f, k in BAD],
                         ids=[name for name, _, _ in BAD])
def test_bad_frames(frame, kind):
    with pytest.raises(ProtocolError) as info:
        decode(frame)
    assert info.value.kind == kind
    assert info.value.reason
    assert str(info.value).startswith(f"{kind}: ")


def test_non_finite_metric_value_rejected():
    # JSON cannot carry NaN; a hand-built object that does is refused all the same.
    from renacerd.client import protocol

    obj = orjson.loads(encode(MESSAGES[2]))
    obj["md"]["metrics"] = {"acc": float("nan")}
    with pytest.raises(ProtocolError) as info:
        protocol._span_start(obj)
    assert info.value.kind == "value" and "finite" in info.value.reason


def test_max_frame_is_64k_and_exact_size_passes():
    assert MAX_FRAME == 65536
    body = orjson.dumps({"t": "dropped", "n": 1, "pad": ""})
    frame = body[:-2] + b" " * (MAX_FRAME - len(body)) + body[-2:]
    assert len(frame) == MAX_FRAME
    assert decode(frame) == Dropped(1)


def test_encode_refuses_oversized():
    md = ExperimentMetadata("m", metrics={f"{i:0>100}": 1.0 for i in range(700)})
    with pytest.raises(ProtocolError) as info:
        encode(SpanStart(SPAN, TRACE, None, "s", SpanType.EXPERIMENT, md, 1, 1, 1, 1))
    assert info.value.kind == "oversized"


def test_span_set_fields_are_the_keys_sent():
    msg = decode(orjson.dumps({"t": "span_set", "span": SPAN, "md": {"step": 3}}))
    assert isinstance(msg, SpanSet)
    assert msg.fields == frozenset({"step"}) and msg.update.step == 3


def test_unknown_keys_are_ignored():
    obj = orjson.loads(encode(Dropped(2)))
    obj["future_field"] = {"x": 1}
    assert decode(orjson.dumps(obj)) == Dropped(2)


def test_decode_accepts_memoryview():
    frame = bytearray(encode(Dropped(5))) + b"junk"
    assert decode(memoryview(frame)[: len(frame) - 4]) == Dropped(5)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False)
    | st.text(),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids,
                                                              max_size=4),
    max_leaves=12,
)


def _message_like(draw_type, body):
    body = dict(body)
    body["t"] = draw_type
    return orjson.dumps(body)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_bytes_only_protocol_error(frame):
    try:
        decode(frame)
    except ProtocolError:
        pass


@settings(max_examples=600, deadline=None)
@given(st.sampled_from(["hello", "span_start", "span_set", "span_end", "dropped", "trace_me",
                        "ack", "x"]),
       st.dictionaries(st.sampled_from(["v", "pid", "run", "span", "trace", "parent", "name",
                                        "kind", "md", "mono", "wall", "tid", "lc", "status",
                                        "msg", "exc", "n", "req", "ok", "reason", "client"]),
                       json_values, max_size=12))
def test_fuzz_structured_only_protocol_error(kind, body):
    try:
        decode(_message_like(kind, body))
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(MESSAGES), st.integers(min_value=0, max_value=400))
def test_fuzz_truncations_only_protocol_error(msg, cut):
    frame = encode(msg)
    try:
        decode(frame[: min(cut, len(frame) - 1)])
    except ProtocolError:
        return
    raise AssertionError("a truncated frame decoded")


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(MESSAGES), st.data())
def test_fuzz_mutated_fields_only_protocol_error(msg, data):
    obj = orjson.loads(encode(msg))
    key = data.draw(st.sampled_from(sorted(obj)))
    obj[key] = data.draw(json_values)
    try:
        decode(orjson.dumps(obj))
    except ProtocolError:
        pass


I64_MAX = 2**63 - 1


@pytest.mark.parametrize("frame", [
    start(wall=2**64 - 1),
    start(mono=2**63),
    start(lc=2**64 - 1),
    orjson.dumps(["s", SPAN, TRACE, None, "n", "", None, None, None, {}, 1, 2**64 - 1, 1, 1]),
    orjson.dumps({"t": "span_end", "span": SPAN, "status": "ok", "mono": 1,
                  "wall": 2**64 - 1, "lc": 1}),
    orjson.dumps(["e", SPAN, 1, 2**64 - 1, 1]),
    orjson.dumps({"t": "dropped", "n": 2**32}),
], ids=["start wall", "start mono", "start lc", "compact start wall", "end wall",
        "compact end wall", "dropped"])
def test_integers_beyond_the_store_are_refused(frame):
    # SQLite keeps signed 64-bit integers: 2^64-1 once killed a run's tracer at the insert.
    with pytest.raises(ProtocolError) as e:
        decode(frame)
    assert e.value.kind == "value"


def test_largest_clocks_reach_the_store(tmp_path):
    from renacerd.serve.span_server import PeerCred
    from renacerd.serve.spans import SpanBook
    from renacerd.store.database import Store

    peer = PeerCred(1, 0, 0, 1)
    book = SpanBook()
    book.handle(peer, decode(start(mono=I64_MAX, wall=I64_MAX, lc=I64_MAX)))
    book.handle(peer, decode(orjson.dumps({"t": "span_end", "span": SPAN, "status": "ok",
                                           "mono": I64_MAX, "wall": I64_MAX, "lc": I64_MAX})))
    book.handle(peer, Dropped(2**32 - 1))
    st = Store(tmp_path / "t.db", create=True)
    run = st.begin_run("r", cmdline=[], version="0", syscall_table={}, start_wall_ns=1,
                       start_mono_ns=1, owner_uid=0)
    records = book.drain()
    st.add_spans(run, records, {})
    st.update_run(run, client_dropped=book.counts()["client_dropped"])
    st.commit()
    (span,) = st.span_records(run)
    assert (span.end_time_nanos, span.end_mono_nanos, span.logical_clock) == (I64_MAX,) * 3
    assert st.run("r").client_dropped == 2**32 - 1


def test_hello_pid_is_optional():
    assert decode(b'{"t":"hello","v":2}') == Hello(PROTOCOL_VERSION, 0, None, "")
    assert decode(b'{"t":"hello","v":2,"pid":null}') == Hello(PROTOCOL_VERSION, 0, None, "")
