"""PyTorch Lightning callback: one experiment span per training batch."""

from __future__ import annotations

from typing import Any, Optional

try:
    from lightning.pytorch import Callback
except ImportError:
    from pytorch_lightning import Callback

from renacerd.client import Span, experiment_span


def _loss(outputs: Any) -> Optional[float]:
    loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
    if loss is None:
        return None
    try:
        # On a GPU this waits for the step to finish; pass record_loss=False to avoid it.
        return float(loss.detach()) if hasattr(loss, "detach") else float(loss)
    except (TypeError, ValueError, RuntimeError):
        return None


class RenacerCallback(Callback):
    """A span per training batch: epoch and optimizer step from the Trainer, loss from outputs.

    The span's step is trainer.global_step after the batch (optimizer steps completed), as in
    the Hugging Face callback.
    """

    def __init__(self, span_name: str = "training_step", model_name: Optional[str] = None,
                 record_loss: bool = True) -> None:
        self.span_name = span_name
        self.model_name = model_name
        self.record_loss = record_loss
        self._span: Optional[Span] = None

    def _finish(self, exc: Optional[BaseException] = None) -> None:
        span, self._span = self._span, None
        if span is not None:
            span.__exit__(type(exc) if exc is not None else None, exc, None)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
                             ) -> None:
        """Open the batch's span."""
        self._finish()
        self._span = experiment_span(
            self.span_name, model_name=self.model_name or type(pl_module).__name__,
            epoch=trainer.current_epoch, step=trainer.global_step)
        self._span.__enter__()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Set the optimizer step now completed and the batch's loss, and close the span."""
        if self._span is None:
            return
        loss = _loss(outputs) if self.record_loss else None
        self._span.set(step=trainer.global_step, loss=loss)
        self._finish()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """A crash inside a batch ends its span with status Error."""
        self._finish(exception)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """Close whatever is still open."""
        self._finish()
