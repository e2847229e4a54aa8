"""The reference API: metadata JSON and attributes, spans, SpanRecord, Lamport clock, scores."""

from __future__ import annotations

import math
import os
import threading

import orjson
import pytest

from renacerd.experiment_span import (
    EquivalenceScore,
    ExperimentMetadata,
    ExperimentSpan,
    LamportClock,
    MetadataError,
    SpanKind,
    SpanRecord,
    SpanType,
    StatusCode,
    clock,
    format_number,
    new_span_id,
    new_trace_id,
    parse_traceparent,
)

GPT2 = ExperimentMetadata("gpt-2", 10, 1000, 0.0025, {"accuracy": 0.95, "f1_score": 0.92})


def test_span_type_default_and_values():
    assert SpanType.default() is SpanType.SYSCALL
    assert [t.value for t in SpanType] == ["syscall", "gpu", "experiment"]


def test_enum_values_match_span_record():
    assert [int(k) for k in SpanKind] == [0, 1, 2, 3, 4]
    assert (StatusCode.UNSET, StatusCode.OK, StatusCode.ERROR) == (0, 1, 2)


def test_metadata_default():
    md = ExperimentMetadata.default()
    assert md == ExperimentMetadata("", None, None, None, {})
    assert md.to_json() == '{"model_name":"","epoch":null,"step":null,"loss":null,"metrics":{}}'


def test_to_json_order_and_values():
    assert GPT2.to_json() == (
        '{"model_name":"gpt-2","epoch":10,"step":1000,"loss":0.0025,'
        '"metrics":{"accuracy":0.95,"f1_score":0.92}}'
    )


def test_json_round_trip():
    assert ExperimentMetadata.from_json(GPT2.to_json()) == GPT2
    assert ExperimentMetadata.from_json(GPT2.to_json().encode()) == GPT2


def test_from_json_missing_fields_take_defaults():
    assert ExperimentMetadata.from_json('{"model_name": "bert"}') == ExperimentMetadata("bert")
    assert ExperimentMetadata.from_json("{}") == ExperimentMetadata()
    md = ExperimentMetadata.from_json('{"step": 5, "unknown": [1, 2]}')
    assert md.step == 5 and md.epoch is None


def test_from_json_int_loss_and_metrics_become_float():
    md = ExperimentMetadata.from_json('{"loss": 1, "metrics": {"acc": 1}}')
    assert md.loss == 1.0 and type(md.loss) is float
    assert md.metrics == {"acc": 1.0} and type(md.metrics["acc"]) is float


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "invalid metadata JSON"),
        ('{"model_name": "x"', "invalid metadata JSON"),
        ("NaN", "invalid metadata JSON"),
        ('{"loss": 1e400}', "invalid metadata JSON"),
        ("[1, 2]", "must be a JSON object, got list"),
        ('{"model_name": 3}', "model_name must be a string"),
        ('{"model_name": null}', "model_name must be a string"),
        ('{"epoch": "1"}', "epoch must be an integer or null, got str"),
        ('{"epoch": 1.5}', "epoch must be an integer or null, got float"),
        ('{"epoch": true}', "epoch must be an integer or null, got bool"),
        ('{"epoch": -1}', "epoch must be in 0..4294967295"),
        ('{"epoch": 4294967296}', "epoch must be in 0..4294967295"),
        ('{"step": -5}', "step must be in 0..18446744073709551615"),
        ('{"loss": "low"}', "loss must be a number, got str"),
        ('{"loss": false}', "loss must be a number, got bool"),
        ('{"metrics": [1]}', "metrics must be an object, got list"),
        ('{"metrics": null}', "metrics must be an object, got NoneType"),
        ('{"metrics": {"acc": "high"}}', "metrics['acc'] must be a number, got str"),
        ('{"metrics": {"acc": null}}', "metrics['acc'] must be a number, got NoneType"),
    ],
)
def test_from_json_errors(text, message):
    with pytest.raises(MetadataError, match=message.replace("[", r"\[").replace(".", r"\.")):
        ExperimentMetadata.from_json(text)


def test_metadata_error_is_value_error():
    assert issubclass(MetadataError, ValueError)


def test_from_dict_rejects_non_finite():
    with pytest.raises(MetadataError, match="loss must be a finite number, got nan"):
        ExperimentMetadata.from_dict({"loss": math.nan})
    with pytest.raises(MetadataError, match="must be a finite number, got inf"):
        ExperimentMetadata.from_dict({"metrics": {"x": math.inf}})


def test_to_attributes_reference_keys():
    assert GPT2.to_attributes() == {
        "experiment.model_name": "gpt-2",
        "experiment.epoch": "10",
        "experiment.step": "1000",
        "experiment.loss": "0.0025",
        "experiment.metrics.accuracy": "0.95",
        "experiment.metrics.f1_score": "0.92",
    }


def test_to_attributes_only_set_fields():
    assert ExperimentMetadata("m").to_attributes() == {"experiment.model_name": "m"}
    assert ExperimentMetadata("m", step=0).to_attributes() == {
        "experiment.model_name": "m", "experiment.step": "0"}


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (1.0, "1"), (0.0, "0"), (-0.0, "-0"), (0.5, "0.5"), (0.1, "0.1"), (1.5, "1.5"),
        (0.0025, "0.0025"), (1e-7, "0.0000001"), (1.5e-10, "0.00000000015"),
        (1e16, "10000000000000000"), (1e20, "100000000000000000000"), (123.456, "123.456"),
        (-2.5, "-2.5"), (1 / 3, "0.3333333333333333"), (math.nan, "NaN"), (math.inf, "inf"),
        (-math.inf, "-inf"), (7, "7"), (2**64 - 1, "18446744073709551615"),
    ],
)
def test_format_number_is_rust_display(value, text):
    assert format_number(value) == text


def test_format_number_round_trips():
    for x in (0.1, 1 / 3, 2.0**-30, 6.02214076e23, 1e-300, 5e-324, 1.7976931348623157e308):
        assert float(format_number(x)) == x
        assert "e" not in format_number(x)


def test_ids_random_nonzero_sized():
    traces = {new_trace_id() for _ in range(1000)}
    spans = {new_span_id() for _ in range(1000)}
    assert len(traces) == 1000 and len(spans) == 1000
    assert all(len(t) == 16 and any(t) for t in traces)
    assert all(len(s) == 8 and any(s) for s in spans)


def test_forked_child_draws_different_ids():
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(w, new_span_id())
        os._exit(0)
    os.close(w)
    child = os.read(r, 8)
    os.close(r)
    os.waitpid(pid, 0)
    assert child != new_span_id()


def test_new_experiment():
    span = ExperimentSpan.new_experiment("training_step", GPT2)
    assert span.span_type is SpanType.EXPERIMENT
    assert len(span.trace_id) == 16 and len(span.span_id) == 8
    assert span.parent_span_id is None
    assert span.start_time_nanos > 0 and span.start_mono_nanos > 0
    assert span.end_time_nanos == 0 and not span.ended
    assert span.process_id == os.getpid()
    assert span.thread_id == threading.get_native_id()


def test_new_experiment_with_parent():
    root = ExperimentSpan.new_experiment("epoch", ExperimentMetadata("m", epoch=1))
    child = ExperimentSpan.new_experiment_with_parent(
        "step", ExperimentMetadata("m", step=3), root.trace_id, root.span_id)
    assert child.trace_id == root.trace_id
    assert child.parent_span_id == root.span_id
    assert child.span_id != root.span_id
    with pytest.raises(ValueError, match="trace_id"):
        ExperimentSpan.new_experiment_with_parent("x", GPT2, bytes(16), None)
    with pytest.raises(ValueError, match="parent_span_id"):
        ExperimentSpan.new_experiment_with_parent("x", GPT2, root.trace_id, b"\x01")


def test_end_is_idempotent_and_advances_clock():
    span = ExperimentSpan.new_experiment("s", GPT2)
    start_clock = span.logical_clock
    span.end()
    first = (span.end_time_nanos, span.end_mono_nanos, span.logical_clock)
    assert span.ended and span.end_mono_nanos >= span.start_mono_nanos
    assert span.logical_clock > start_clock
    span.end()
    assert (span.end_time_nanos, span.end_mono_nanos, span.logical_clock) == first


def test_to_span_record():
    span = ExperimentSpan.new_experiment("training_step", GPT2)
    span.end()
    rec = span.to_span_record()
    assert isinstance(rec, SpanRecord)
    assert rec.span_kind is SpanKind.INTERNAL and rec.status_code is StatusCode.OK
    assert rec.span_name == "training_step"
    assert rec.duration_nanos == rec.end_time_nanos - rec.start_time_nanos >= 0
    assert rec.logical_clock == span.logical_clock
    assert rec.thread_id == threading.get_native_id() != 0
    assert rec.process_id == os.getpid()
    assert (rec.start_mono_nanos, rec.end_mono_nanos) == (span.start_mono_nanos,
                                                          span.end_mono_nanos)
    assert rec.attributes() == {**GPT2.to_attributes(), "span.type": "experiment"}
    assert rec.resource() == {"service.name": "renacer", "span.type": "experiment"}
    assert rec.trace_id_hex() == span.trace_id.hex() and len(rec.trace_id_hex()) == 32
    assert rec.span_id_hex() == span.span_id.hex() and len(rec.span_id_hex()) == 16


def test_record_of_open_span_has_zero_duration():
    rec = ExperimentSpan.new_experiment("s", GPT2).to_span_record()
    assert rec.end_time_nanos == 0 and rec.duration_nanos == 0


def test_record_reports_thread_of_creation():
    box = {}

    def work():
        span = ExperimentSpan.new_experiment("s", GPT2)
        box["tid"] = threading.get_native_id()
        box["span"] = span

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert box["span"].to_span_record().thread_id == box["tid"] != threading.get_native_id()


def test_lamport_clock_tick_and_observe():
    c = LamportClock()
    assert [c.tick(), c.tick()] == [1, 2]
    assert c.observe(10) == 11
    assert c.tick() == 12
    assert c.observe(3) == 13
    assert c.tick() == 14


def test_lamport_clock_is_thread_safe():
    c = LamportClock()
    seen: list[int] = []

    def work():
        seen.extend(c.tick() for _ in range(10000))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(seen) == list(range(1, 40001))


def test_spans_advance_process_clock():
    before = clock.tick()
    span = ExperimentSpan.new_experiment("s", GPT2)
    span.end()
    after = clock.tick()
    assert before < span.logical_clock < after


def test_traceparent_format_and_parse():
    span = ExperimentSpan.new_experiment("s", GPT2)
    header = span.traceparent()
    assert header == f"00-{span.trace_id.hex()}-{span.span_id.hex()}-01"
    assert span.to_span_record().traceparent() == header
    assert parse_traceparent(header) == (span.trace_id, span.span_id, 1)


def test_parse_traceparent_w3c_example():
    trace, span, flags = parse_traceparent(
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    assert trace.hex() == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert span.hex() == "00f067aa0ba902b7" and flags == 1


@pytest.mark.parametrize(
    "header",
    [
        "", "garbage", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
    ],
)
def test_parse_traceparent_rejects(header):
    with pytest.raises(ValueError):
        parse_traceparent(header)


def test_parse_traceparent_future_version_may_extend():
    trace, span, _ = parse_traceparent(
        "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more")
    assert span.hex() == "00f067aa0ba902b7"


def test_equivalence_reference_vectors():
    score = EquivalenceScore(0.9, 0.1, 0.9)
    assert score.overall() == pytest.approx(0.9)
    assert score.is_equivalent()
    assert not EquivalenceScore(0.5, 0.8, 0.4).is_equivalent()
    assert not EquivalenceScore(0.3, 0.8, 0.3).is_equivalent()
    assert EquivalenceScore(0.5, 0.8, 0.4).overall() == pytest.approx(0.2 + 0.04 + 0.16)
    assert EquivalenceScore(1.0, 0.0, 1.0).overall() == pytest.approx(1.0)
    assert EquivalenceScore(0.9, 0.1, 0.9).exact is True


def test_equivalence_threshold():
    score = EquivalenceScore(0.625, 0.0, 1.0)
    assert score.overall() == pytest.approx(0.85)
    assert score.is_equivalent(threshold=0.85 - 1e-9)
    assert not EquivalenceScore(0.9, 0.1, 0.9).is_equivalent(threshold=0.95)


def test_attributes_json_is_valid_json():
    rec = ExperimentSpan.new_experiment("s", ExperimentMetadata("m\"x", metrics={"a.b": 2.0})
                                        ).to_span_record()
    assert orjson.loads(rec.attributes_json)["experiment.metrics.a.b"] == "2"
    assert orjson.loads(rec.attributes_json)["experiment.model_name"] == 'm"x'
