"""The exponential moving average of the weights, on the device the model trains on."""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.callbacks import EMAWeightAveraging


class DeviceEMA(EMAWeightAveraging):
    """Lightning's moving average of the weights, moved to the model's device as fit starts.

    Lightning makes the average as fit sets up, before the model moves to its device, so on
    a GPU it stayed in host memory: every step copied all the weights to the host and
    averaged them there, and every validation copied the average back.
    """

    @property
    def state_key(self) -> str:
        """Lightning's own: resume points saved before this class resume with their state."""
        return EMAWeightAveraging.__qualname__

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        # Made, and restored from a resume point, by now; the model is on its device. The count of
        # updates goes too: the average's two checks of it wait for the GPU, but a count left on the
        # host would be copied to the device once a parameter, each copy a wait.
        if self._average_model is not None:
            self._average_model.to(pl_module.device)
