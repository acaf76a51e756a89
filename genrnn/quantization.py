"""int8 dynamic quantization for CPU decoding: int8 weights, activations quantized on the fly."""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from genrnn.ensemble import Ensemble
from genrnn.errors import ConfigurationError
from genrnn.model import Seq2Seq


def quantize_int8(model: Seq2Seq | Ensemble) -> Seq2Seq | Ensemble:
    """A copy of ``model`` (one or an ensemble) whose LSTM/GRU and linear layers run with int8 weights (CPU only).

    A plain RNN's recurrent layers stay float32: torch has no dynamic int8 kernel for ``nn.RNN``.
    """
    from torch.ao.quantization import quantize_dynamic

    device = next(model.parameters()).device
    if device.type != "cpu":
        raise ConfigurationError(f"quantize: int8 decoding runs on the CPU; the model is on {device}")
    dtype = next(model.parameters()).dtype
    if dtype != torch.float32:  # the int8 kernels take float32 activations: another type fails only mid-decoding
        raise ConfigurationError(f"quantize: int8 decoding takes a float32 model; this one is {dtype}")
    with warnings.catch_warnings():
        # torch.ao.quantization warns that it moves to torchao, whose quantize_ has no recurrent layers.
        warnings.simplefilter("ignore")
        quantized = quantize_dynamic(copy.deepcopy(model).eval(), {nn.LSTM, nn.GRU, nn.Linear}, dtype=torch.qint8)
    # The int8 recurrent layers have no oneDNN kernel: encoding by length would only add calls (BENCHMARKS.md).
    # An ensemble's members encode for it: each one is told.
    for module in quantized.modules():
        if isinstance(module, Seq2Seq):
            module.encode_by_length = False
    return quantized
