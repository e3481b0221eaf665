"""jaxcryo: differentiable cryo-EM 3D reconstruction in JAX with Hutchinson-preconditioned SGD."""

__version__ = "0.1.0"
