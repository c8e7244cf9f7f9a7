"""megu_jax: machine unlearning for image classifiers in JAX/Flax, built around MeGU.

Importing the package changes nothing in the process: the XLA:CPU settings of
:mod:`megu_jax.xla_cpu` are applied by the ``experiments/`` commands (or an explicit
``megu_jax.xla_cpu.apply_cpu_defaults()`` before JAX's first computation).
"""

__version__ = "0.1.0"
