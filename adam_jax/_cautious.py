"""Cautious updates: keep only the components of a direction that agree with the gradient."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, TypeAlias, get_args

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.tree_util import Partial

from adam_jax import _checks, _dtypes, _quantize

Form: TypeAlias = Literal["timm", "paper"]
FORMS: tuple[Form, ...] = get_args(Form)
# An alias's ``cautious`` argument: off, on (``True`` = ``"timm"``) or a form.
Cautious: TypeAlias = bool | Form


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class CautiousConfig:
    form: Form


def _init(scaler_init: Any, params: optax.Params) -> optax.OptState:
    return scaler_init(params)


def _update(
    config: CautiousConfig,
    scaler: optax.GradientTransformation,
    updates: optax.Updates,
    state: optax.OptState,
    params: optax.Params | None = None,
) -> tuple[optax.Updates, optax.OptState]:
    directions, new_state = scaler.update(updates, state, params)
    # Any scaler state with a first moment; 8-bit moments are read back as float32.
    moments = _quantize.dequantize_state(getattr(new_state, "m"))  # noqa: B009
    masked = jax.tree.map(
        lambda u, m, g: _masked(u, m, g, config.form), directions, moments, updates
    )
    return masked, new_state


def _parts(x: jax.Array) -> jax.Array:
    """A complex array as its real and imaginary parts (torch's ``view_as_real``)."""
    return jnp.stack([jnp.real(x), jnp.imag(x)], -1) if jnp.iscomplexobj(x) else x


def _masked(u: jax.Array, m: jax.Array, g: jax.Array, form: Form) -> jax.Array:
    """``u·mask`` with ``mask = (m·g > 0)`` normalised per tensor."""
    if u.size == 0:
        return u
    cdt, rdt = _dtypes.dtypes_of(g)
    agree = _parts(_dtypes.cast(m, cdt)) * _parts(_dtypes.cast(g, cdt)) > 0
    mask = agree.astype(rdt)
    total = jnp.sum(mask)
    if form == "timm":  # mask / max(mean(mask), 1e-3)
        factor = 1 / lax.max(total / mask.size, jnp.asarray(1e-3, rdt))
    else:  # mask · numel / (sum(mask) + 1)
        factor = mask.size / (total + 1)
    mask = mask * factor
    u_parts = _parts(_dtypes.cast(u, cdt)) * mask
    if jnp.iscomplexobj(u):
        return _dtypes.cast(lax.complex(u_parts[..., 0], u_parts[..., 1]), u.dtype)
    return _dtypes.cast(u_parts, u.dtype)


def form_of(cautious: Cautious) -> Form | None:
    """The normalisation a ``cautious`` argument asks for: None (off), ``"timm"`` or ``"paper"``."""
    if isinstance(cautious, bool):
        return "timm" if cautious else None
    if isinstance(cautious, str):
        _checks.check_choice("cautious", cautious, FORMS)
        return cautious
    raise TypeError(f"cautious must be a bool, 'timm' or 'paper', got cautious={cautious!r}")


def cautious(
    scaler: optax.GradientTransformation, form: Form = "timm"
) -> optax.GradientTransformation:
    r"""Make a ``scale_by_*`` transformation cautious (Liang et al., 2024).

    After ``scaler`` has updated its first moment :math:`m_t` (its state's ``m``)
    from the gradient :math:`g_t` it received, each component of its output
    direction :math:`u_t` is kept only where :math:`m_t` and :math:`g_t` agree in
    sign, and the survivors are scaled up so that the tensor's step keeps its size:

    .. math::

      \phi_t = \mathbb{1}[m_t \odot g_t > 0], \qquad u_t \leftarrow u_t \odot \phi_t \cdot s_t

    with, per tensor of :math:`n` elements,

    * ``form="timm"``: :math:`s_t = 1/\max(\mathrm{mean}(\phi_t), 10^{-3})`, the
      rule of timm's ``cadamw`` (``AdamWLegacy(caution=True)``,
      ``timm/optim/adamw.py``);
    * ``form="paper"``: :math:`s_t = n/(\sum \phi_t + 1)`, the paper's normalisation
      and pytorch-optimizer's ``apply_cautious``.

    The state is ``scaler``'s, unchanged (the mask is not stored). With 8-bit states
    (``state_bits=8``) the mask reads the first moment as stored, after its 8-bit
    rounding (no reference combines the two). Complex leaves
    are masked part by part, as torch's ``view_as_real`` sees them. Weight decay
    and the learning rate, added by the aliases around the scaler, are not masked.

    Args:
      scaler: a transformation whose state has a field ``m``, the first moment after
        the update (every ``adam_jax.scale_by_*`` with a first moment).
      form: ``"timm"`` or ``"paper"``, the normalisation of the mask.

    Returns:
      An ``optax.GradientTransformation`` with ``scaler``'s state; a pytree whose
      leaves are ``scaler``'s.

    Example:
      >>> import jax.numpy as jnp, adam_jax
      >>> opt = adam_jax.cautious(adam_jax.scale_by_adam(b1=0.5, eps=0.0))
      >>> state = opt.init(jnp.zeros(4))
      >>> _, state = opt.update(jnp.array([1.0, 1.0, 1.0, 1.0]), state)
      >>> u, state = opt.update(jnp.array([1.0, 1.0, -0.25, 1.0]), state)
      >>> print((3 * u).round(3))  # m > 0 > g in one of four; the rest are scaled by 4/3
      [4. 4. 0. 4.]

    References:
      Liang, Chen, Liu & Liu, *Cautious Optimizers: Improving Training with One
      Line of Code*, 2024 (arXiv:2411.16085).
    """
    _checks.check_choice("form", form, FORMS)
    return optax.GradientTransformation(
        Partial(_init, scaler.init), Partial(_update, CautiousConfig(form), scaler)
    )


def maybe(scaler: optax.GradientTransformation, cautious_: Cautious) -> Any:
    """``scaler``, made cautious when an alias's ``cautious`` argument asks for it."""
    form = form_of(cautious_)
    return scaler if form is None else cautious(scaler, form)
