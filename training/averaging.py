"""The exponential moving average of the weights, on the device the model trains on."""

from __future__ import annotations

from collections.abc import Callable

import pytorch_lightning as pl
from pytorch_lightning.callbacks import EMAWeightAveraging, WeightAveraging
from torch import Tensor
from torch.optim.swa_utils import get_ema_multi_avg_fn


class DeviceEMA(WeightAveraging):
    """Lightning's moving average of the weights, moved to the model's device as fit starts, and
    updated by one fused operation over all weights.

    Lightning makes the average as fit sets up, before the model moves to its device, so on
    a GPU it stayed in host memory: every step copied all the weights to the host and
    averaged them there, and every validation copied the average back. And it updates one
    weight at a time, a few operations each: on a GPU, each a kernel to launch.
    """

    def __init__(self, decay: float) -> None:
        # Lightning's EMAWeightAveraging with its defaults (an update after every step), but for the
        # update: torch's fused form of the same average, equal up to rounding.
        super().__init__(multi_avg_fn=_in_the_averages_type(get_ema_multi_avg_fn(decay)))

    @property
    def state_key(self) -> str:
        """Lightning's own: resume points saved before this class resume with their state."""
        return EMAWeightAveraging.__qualname__

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        # Made, and restored from a resume point, by now; the model is on its device. The count of
        # updates goes too: each update's two checks of it then wait for the GPU, where left on the
        # host it would be copied there at each update, a wait as well.
        if self._average_model is not None:
            self._average_model.to(pl_module.device)


def _in_the_averages_type(update: Callable) -> Callable:
    """``update`` given each weight in its average's type: the average is made before the weights take
    their precision (``bf16-true``), and the fused update takes one type."""

    def update_as_the_average(average: list[Tensor], current: list[Tensor], count: Tensor) -> None:
        update(average, [weight.to(kept.dtype) for kept, weight in zip(average, current)], count)

    return update_as_the_average
