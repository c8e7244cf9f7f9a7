"""The experiment harness: the main job, benchmarks, target checks, reports and the commands' plumbing.

Built on the library (``megu_jax.datasets``, ``train``, ``unlearning``, ``evaluation``...); the
``experiments/`` scripts are thin command-line fronts to these modules.
"""
