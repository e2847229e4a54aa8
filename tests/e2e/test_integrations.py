"""Hugging Face and Lightning callbacks on tiny models built here, with a real SpanServer."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from renacerd.client import core as client
from renacerd.experiment_span import StatusCode
from renacerd.serve.span_server import SpanServer
from renacerd.serve.spans import SpanBook

torch = pytest.importorskip("torch")


@pytest.fixture
def book():
    d = tempfile.mkdtemp(prefix="rsi", dir="/tmp")
    spans = SpanBook()
    server = SpanServer(os.path.join(d, "i.sock"), on_message=spans.handle,
                        on_disconnect=spans.disconnected)
    server.start()
    client.configure(socket=server.address)
    yield spans
    client.configure(socket=os.path.join(d, "gone.sock"))
    server.stop()
    shutil.rmtree(d, ignore_errors=True)


def finished(book, n):
    import time

    deadline = time.monotonic() + 10
    while book.counts()["spans_ended"] < n and time.monotonic() < deadline:
        time.sleep(0.01)
    return sorted(book.drain(), key=lambda r: r.start_mono_nanos)


class Tiny(torch.nn.Module):
    """y = w x + b with a squared-error loss, the Trainer's model contract."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 1)

    def forward(self, x, labels=None):
        out = self.lin(x).squeeze(-1)
        loss = torch.nn.functional.mse_loss(out, labels)
        return {"loss": loss, "logits": out}


def test_huggingface_span_per_optimizer_step(book, tmp_path):
    transformers = pytest.importorskip("transformers")
    from renacerd.integrations.huggingface import RenacerCallback

    torch.manual_seed(0)
    data = [{"x": torch.randn(2), "labels": torch.randn(())} for _ in range(8)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=2,
        gradient_accumulation_steps=1, logging_steps=2, save_strategy="no", report_to=[],
        use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
    trainer = transformers.Trainer(model=Tiny(), args=args, train_dataset=data,
                                   callbacks=[RenacerCallback(model_name="tiny-linear")])
    trainer.train()
    logged = {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}
    recs = finished(book, 6)
    assert [r.span_name for r in recs] == ["training_step"] * 6
    attrs = [r.attributes() for r in recs]
    assert [a["experiment.step"] for a in attrs] == ["1", "2", "3", "4", "5", "6"]
    assert {a["experiment.model_name"] for a in attrs} == {"tiny-linear"}
    assert sorted(logged) == [2, 4, 6]
    for a in attrs:
        step = int(a["experiment.step"])
        if step in logged:
            assert float(a["experiment.loss"]) == pytest.approx(logged[step])
            assert "experiment.metrics.learning_rate" in a
        else:
            assert "experiment.loss" not in a
    assert all(r.status_code is StatusCode.OK for r in recs)
    assert all(a["experiment.epoch"] == "0" or a["experiment.epoch"].isdigit() for a in attrs)
    ends = [(r.start_mono_nanos, r.end_mono_nanos) for r in recs]
    assert all(e1 <= s2 for (_, e1), (s2, _) in zip(ends, ends[1:]))


def test_lightning_span_per_batch(book):
    pl = pytest.importorskip("lightning.pytorch")
    from renacerd.integrations.lightning import RenacerCallback

    losses = []

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.lin(x).squeeze(-1), y)
            losses.append(float(loss.detach()))
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    ds = torch.utils.data.TensorDataset(torch.randn(8, 2), torch.randn(8))
    loader = torch.utils.data.DataLoader(ds, batch_size=2)
    trainer = pl.Trainer(max_steps=4, max_epochs=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu", callbacks=[RenacerCallback(model_name="tiny")])
    trainer.fit(Module(), loader)
    recs = finished(book, 4)
    attrs = [r.attributes() for r in recs]
    assert [a["experiment.step"] for a in attrs] == ["1", "2", "3", "4"]
    assert [float(a["experiment.loss"]) for a in attrs] == pytest.approx(losses)
    assert [a["experiment.epoch"] for a in attrs] == ["0"] * 4
    assert all(r.status_code is StatusCode.OK for r in recs)


def test_lightning_crash_ends_span_with_error(book):
    pl = pytest.importorskip("lightning.pytorch")
    from renacerd.integrations.lightning import RenacerCallback

    class Crashing(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            if batch_idx == 1:
                raise FloatingPointError("loss exploded")
            return self.lin(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    ds = torch.utils.data.TensorDataset(torch.randn(8, 2), torch.randn(8))
    trainer = pl.Trainer(max_steps=4, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu", callbacks=[RenacerCallback()])
    with pytest.raises(FloatingPointError):
        trainer.fit(Crashing(), torch.utils.data.DataLoader(ds, batch_size=2))
    recs = finished(book, 2)
    assert [r.status_code for r in recs] == [StatusCode.OK, StatusCode.ERROR]
    assert recs[1].attributes()["exception.type"] == "FloatingPointError"
    assert recs[1].attributes()["experiment.model_name"] == "Crashing"
