"""megu_jax: machine unlearning for image classifiers in JAX/Flax, built around MeGU."""
from megu_jax import xla_cpu as _xla_cpu

# Before any submodule can start JAX's backend: XLA reads its flags once, at that moment.
_xla_cpu.apply_cpu_defaults()

__version__ = "0.1.0"
