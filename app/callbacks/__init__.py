"""Training callbacks, one per file."""

from app.callbacks.checkpointing import Checkpointing
from app.callbacks.interrupt import Interrupt
from app.callbacks.moe_metrics import MoEMetrics
from app.callbacks.step_metrics import StepMetrics

__all__ = ["Checkpointing", "Interrupt", "MoEMetrics", "StepMetrics"]
