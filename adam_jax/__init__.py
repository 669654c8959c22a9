"""adam_jax: Adam, AMSGrad and Adamax for JAX, exact against PyTorch, optax and Keras."""

from adam_jax._adam import AdamState, adam, adamw, scale_by_adam
from adam_jax._adamax import AdamaxState, adamax, adamaxw, scale_by_adamax
from adam_jax._amsgrad import AMSGradState, amsgrad, scale_by_amsgrad

__version__ = "0.1.0"

__all__ = [
    "AMSGradState",
    "AdamState",
    "AdamaxState",
    "adam",
    "adamax",
    "adamaxw",
    "adamw",
    "amsgrad",
    "scale_by_adam",
    "scale_by_adamax",
    "scale_by_amsgrad",
]
