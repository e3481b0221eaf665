"""The known-pose least-squares objective, its gradient and Hessian-vector products.

For a minibatch ``B`` of images ``y_i`` (centred Fourier transforms) and the forward model ``S_i`` of
:class:`jaxcryo.projection.Projector`,

    ``F_B(v) = (1 / |B|) sum_i  w_i / 2 * || M (S_i v - y_i) ||^2  +  (lam / 2) || v ||^2``

over the centred Fourier volume ``v`` (complex ``(n, n, n)``), where ``w_i`` is the inverse noise variance of
image ``i``, ``M`` the projector's image-frequency mask, and padded batch entries have ``mask_i = 0``.

Complex parameters: ``jax.grad`` of a real function of complex ``v`` returns the *conjugate* of the
steepest-ascent direction. Every gradient returned here (:func:`gradient`, :func:`value_and_grad`,
:func:`hvp`) is conjugated back, so ``v - eta * g`` lowers the loss for small ``eta`` and the Hessian
``H z = (1/|B|) sum_i w_i S_i^H M S_i z + lam z`` is complex-linear. optax transformations (``sgd``,
``adam``) then work as if the real and imaginary parts were separate real parameters.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Complex, Float

from .batch import Batch
from .projection import Projector


def loss(vol_f: Complex[Array, "n n n"], batch: Batch, projector: Projector, lam: float = 0.0,
         vol_mask: Float[Array, "n n n"] | None = None) -> Float[Array, ""]:
    """``F_B(v)`` above (a real scalar). ``vol_mask`` (``(n, n, n)`` 0/1) restricts the volume's support."""
    v = vol_f if vol_mask is None else vol_f * vol_mask
    rdt = jnp.real(vol_f).dtype
    pred = projector(v, batch.rotations, batch.shifts, batch.ctf)
    resid = (pred - batch.images_f) * projector.image_mask(rdt)
    per_image = 0.5 * jnp.sum(jnp.real(resid * jnp.conj(resid)), axis=(-2, -1))
    wm = batch.weights * batch.mask
    data = jnp.sum(wm * per_image) / jnp.maximum(jnp.sum(batch.mask), 1.0)
    reg = 0.5 * lam * jnp.sum(jnp.real(vol_f * jnp.conj(vol_f)))
    return data + reg


def objective(batch: Batch, projector: Projector, lam: float = 0.0, vol_mask=None) -> Callable:
    """The closure ``v -> F_B(v)`` for one batch: optax's ``obj_fn`` / ``value_fn`` extra argument."""
    return lambda v: loss(v, batch, projector, lam, vol_mask)


def gradient(fn: Callable) -> Callable:
    """Steepest-ascent gradient ``v -> conj(jax.grad(fn)(v))`` of a real function of a complex volume."""
    g = jax.grad(fn)

    def grad_fn(v):
        out = g(v)
        return jnp.conj(out) if jnp.iscomplexobj(out) else out

    return grad_fn


def value_and_grad(fn: Callable) -> Callable:
    """``v -> (fn(v), steepest-ascent gradient)``."""
    vg = jax.value_and_grad(fn)

    def f(v):
        val, g = vg(v)
        return val, (jnp.conj(g) if jnp.iscomplexobj(g) else g)

    return f


def hvp(fn: Callable, v, z):
    """Hessian-vector product ``H z`` by forward-over-reverse (``jax.jvp`` of the gradient)."""
    return jax.jvp(gradient(fn), (v,), (z,))[1]
