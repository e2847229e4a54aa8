"""renacerd.integrations.torch_distributed: each collective a child span, through a real gloo
process group and a real span socket; the client's hello carries the rank."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import orjson

from tests.conftest import ROOT, wait_for


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_collectives_are_child_spans_with_op_size_dtype_group_seq(span_daemon):
    server, book = span_daemon
    port = _free_port()
    code = textwrap.dedent(f"""
        import torch, torch.distributed as dist
        from renacerd.client.core import configure, experiment_span
        from renacerd.integrations import torch_distributed
        configure(socket={server.address!r})
        dist.init_process_group("gloo")
        torch_distributed.install()
        torch_distributed.install()  # idempotent: one span per call, not two
        with experiment_span("train_step", step=7):
            dist.all_reduce(torch.ones(6, dtype=torch.float64))
            dist.broadcast(torch.zeros(3, dtype=torch.int32), src=0)
            out = [torch.empty(5)]
            dist.all_gather(out, torch.ones(5))
            dist.all_gather_object([None], {{"a": 1}})  # built on all_gather: one span
            dist.barrier()
        torch_distributed.uninstall()
        dist.all_reduce(torch.ones(2))  # not wrapped any more
        dist.destroy_process_group()
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), SECRET_TOKEN="hunter2")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert wait_for(lambda: book.counts()["spans_ended"] == 6 and server.stats["open"] == 0)
    recs = sorted(book.drain(), key=lambda r: r.start_mono_nanos)
    names = [r.span_name for r in recs]
    assert names == ["train_step", "c10d.all_reduce", "c10d.broadcast", "c10d.all_gather",
                     "c10d.all_gather_object", "c10d.barrier"]
    step = recs[0]
    for r in recs[1:]:
        assert r.parent_span_id == step.span_id
        assert r.attributes()["experiment.step"] == "7"
    m = [{k.removeprefix("experiment.metrics.c10d."): v for k, v in r.attributes().items()
          if k.startswith("experiment.metrics.")} for r in recs[1:]]
    dtypes = [r.attributes()["experiment.model_name"] for r in recs[1:]]
    assert dtypes == ["float64", "int32", "float32", "", ""]
    assert [x["numel"] for x in m] == ["6", "3", "5", "0", "0"]
    assert [x["bytes"] for x in m] == ["48", "12", "20", "0", "0"]
    # the sequence number counts the calls on the group (all_gather_object's inner call is
    # not a collective of its own)
    assert [x["seq"] for x in m] == ["1", "2", "3", "4", "5"]
    assert {x["group"] for x in m} == {"0"} and {x["group_size"] for x in m} == {"1"}
    assert {x["async"] for x in m} == {"0"}
    # the hello carried the rank; nothing else of the environment went anywhere
    res = orjson.loads(step.resource_json)
    assert (res["renacer.rank"], res["renacer.local_rank"], res["renacer.world_size"]) == (
        0, 0, 1)
    assert res["renacer.job_id"] == f"127.0.0.1:{port}"
    assert res["renacer.host"] == socket.gethostname()
    assert "hunter2" not in step.resource_json
