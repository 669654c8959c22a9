"""adam_jax: Adam, AMSGrad, Adamax, NAdam, RAdam for JAX, exact against torch, optax and Keras."""

import importlib.metadata

from adam_jax._adam import AdamState, adam, adamw, scale_by_adam
from adam_jax._adamax import AdamaxState, adamax, adamaxw, scale_by_adamax
from adam_jax._amsgrad import AMSGradState, amsgrad, scale_by_amsgrad
from adam_jax._early_stopping import (
    EarlyStopping,
    EarlyStoppingState,
    StopReason,
    early_stopping,
)
from adam_jax._fit import FitResult, History, fit
from adam_jax._fit_batched import BatchedWork, default_slots, fit_batched
from adam_jax._nadam import NAdamState, nadam, nadamw, scale_by_nadam
from adam_jax._quantize import QuantizedArray, dynamic_map, quantize_blockwise
from adam_jax._radam import RAdamState, radam, radamw, scale_by_radam
from adam_jax._sharding import bytes_per_device, zero1_spec, zero1_state_shardings

try:
    __version__ = importlib.metadata.version("adam_jax")  # set in pyproject.toml only
except importlib.metadata.PackageNotFoundError:  # imported from a checkout, not installed
    __version__ = "unknown"

__all__ = [
    "AMSGradState",
    "AdamState",
    "AdamaxState",
    "BatchedWork",
    "EarlyStopping",
    "EarlyStoppingState",
    "FitResult",
    "History",
    "NAdamState",
    "QuantizedArray",
    "RAdamState",
    "StopReason",
    "adam",
    "adamax",
    "adamaxw",
    "adamw",
    "amsgrad",
    "bytes_per_device",
    "default_slots",
    "dynamic_map",
    "early_stopping",
    "fit",
    "fit_batched",
    "nadam",
    "nadamw",
    "quantize_blockwise",
    "radam",
    "radamw",
    "scale_by_adam",
    "scale_by_adamax",
    "scale_by_amsgrad",
    "scale_by_nadam",
    "scale_by_radam",
    "zero1_spec",
    "zero1_state_shardings",
]
