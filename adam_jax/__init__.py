"""adam_jax: Adam, AMSGrad, Adamax, NAdam, RAdam for JAX, exact against torch, optax and Keras."""

import importlib.metadata as _metadata

from adam_jax._adam import AdamState, adam, adamw, scale_by_adam
from adam_jax._adamax import AdamaxState, adamax, adamaxw, scale_by_adamax
from adam_jax._ademamix import AdEMAMixState, ademamix, scale_by_ademamix
from adam_jax._adopt import ADOPTState, adopt, scale_by_adopt
from adam_jax._amsgrad import AMSGradState, amsgrad, scale_by_amsgrad
from adam_jax._cache import enable_compilation_cache
from adam_jax._cautious import cautious
from adam_jax._early_stopping import (
    EarlyStopping,
    EarlyStoppingState,
    StopReason,
    early_stopping,
)
from adam_jax._fit import FitResult, History, fit
from adam_jax._fit_batched import default_slots, fit_batched
from adam_jax._nadam import NAdamState, nadam, nadamw, scale_by_nadam
from adam_jax._quantize import QuantizedArray, dynamic_map, quantize_blockwise
from adam_jax._radam import RAdamState, radam, radamw, scale_by_radam
from adam_jax._result import BatchedWork
from adam_jax._schedule_free import (
    ScheduleFreeState,
    schedule_free_adamw,
    schedule_free_eval_params,
)
from adam_jax._sharding import bytes_per_device, zero1_spec, zero1_state_shardings
from adam_jax._stable_adamw import StableAdamWState, scale_by_stable_adamw, stable_adamw

try:
    __version__ = _metadata.version("adam_jax")  # set in pyproject.toml only
except _metadata.PackageNotFoundError:  # imported from a checkout, not installed
    __version__ = "unknown"

__all__ = [
    "ADOPTState",
    "AMSGradState",
    "AdEMAMixState",
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
    "ScheduleFreeState",
    "StableAdamWState",
    "StopReason",
    "adam",
    "adamax",
    "adamaxw",
    "adamw",
    "ademamix",
    "adopt",
    "amsgrad",
    "bytes_per_device",
    "cautious",
    "default_slots",
    "dynamic_map",
    "early_stopping",
    "enable_compilation_cache",
    "fit",
    "fit_batched",
    "nadam",
    "nadamw",
    "quantize_blockwise",
    "radam",
    "radamw",
    "scale_by_adam",
    "scale_by_adamax",
    "scale_by_ademamix",
    "scale_by_adopt",
    "scale_by_amsgrad",
    "scale_by_nadam",
    "scale_by_radam",
    "scale_by_stable_adamw",
    "schedule_free_adamw",
    "schedule_free_eval_params",
    "stable_adamw",
    "zero1_spec",
    "zero1_state_shardings",
]
