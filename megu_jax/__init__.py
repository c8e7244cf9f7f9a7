"""megu_jax: machine unlearning for image classifiers in JAX/Flax, built around MeGU."""

__version__ = "0.1.0"
