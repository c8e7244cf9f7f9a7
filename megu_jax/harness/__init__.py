"""The experiment harness: the main job, ensembles, benchmarks, target checks, reports, plumbing.

Built on the library (``megu_jax.datasets``, ``train``, ``unlearning``, ``evaluation``...); the
``experiments/`` scripts are thin command-line fronts to these modules.
"""
