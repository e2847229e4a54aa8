"""Hugging Face Trainer callback: one experiment span per optimizer step."""

from __future__ import annotations

from typing import Any, Optional

from transformers import TrainerCallback

from renacerd.client import Span, experiment_span

# Scalars of the Trainer's training logs worth keeping as span metrics.
LOG_METRICS = ("learning_rate", "grad_norm")


class RenacerCallback(TrainerCallback):
    """A span per optimizer step (epoch and step from the TrainerState, loss from on_log).

    The Trainer logs after on_step_end, so on a logging step the span stays open until the
    log arrives and the loss (averaged by the Trainer over the logging interval) is set.
    """

    def __init__(self, span_name: str = "training_step", model_name: Optional[str] = None
                 ) -> None:
        self.span_name = span_name
        self.model_name = model_name
        self._span: Optional[Span] = None
        self._awaiting_log = False

    def _finish(self) -> None:
        span, self._span, self._awaiting_log = self._span, None, False
        if span is not None:
            span.__exit__(None, None, None)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                       **kwargs: Any) -> None:
        """Take the model name from the model's config unless one was given."""
        if self.model_name is None:
            config = getattr(model, "config", None)
            self.model_name = (getattr(config, "name_or_path", "") or type(model).__name__
                               if model is not None else "")

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Open the span of the optimizer step about to run."""
        self._finish()
        self._span = experiment_span(
            self.span_name, model_name=self.model_name or "",
            epoch=int(state.epoch or 0), step=state.global_step + 1)
        self._span.__enter__()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Close the span, or keep it for on_log when the Trainer is about to log."""
        if self._span is None:
            return
        self._span.set(step=state.global_step)
        if control.should_log:
            self._awaiting_log = True
        else:
            self._finish()

    def on_log(self, args: Any, state: Any, control: Any, logs: Optional[dict[str, Any]] = None,
               **kwargs: Any) -> None:
        """Put the logged loss (and learning rate, grad norm) on the step's span and close it."""
        if self._span is None or not self._awaiting_log or not logs or "loss" not in logs:
            return
        metrics = {k: logs[k] for k in LOG_METRICS if isinstance(logs.get(k), (int, float))}
        self._span.set(loss=logs["loss"], metrics=metrics or None)
        self._finish()

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """No step span outlives its epoch."""
        self._finish()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Close whatever is still open."""
        self._finish()
