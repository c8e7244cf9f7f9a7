"""MeGU: perturbing labels from a transition matrix plus the positive/negative feature-noise pair.

docs/method.md §2 describes the method; this package is its executable form, one module per
part:

- :mod:`.config` -- every choice as a field of ``config.megu`` (``default_megu_config``) and the
  checks that run before any compute;
- :mod:`.labels` -- the perturbing labels ỹ drawn from T, optionally guided by the original
  model's posterior;
- :mod:`.targets` -- the margin targets of ``forget_target="non_member_margin"``;
- :mod:`.steps` -- the pure, jitted noise and finetuning steps over :class:`MeguState`;
- :mod:`.method` -- ``megu(trained, forget_data, retain_data, config, key)``, registered as
  ``"megu"``: the machine guidance, then the two phases.

T itself is built by :func:`megu_jax.transition.build_transition`, the noise pair by
:mod:`megu_jax.noise`.
"""
from megu_jax.unlearning.megu.config import (FORGET_TARGETS, LABEL_GUIDANCE, LABEL_MODES,
                                             NO_OP_VALUES, NOISE_PER, NOISE_SCHEDULES,
                                             MissingTransitionFileError, default_megu_config,
                                             megu_settings, noise_rows_per_sample,
                                             own_class_weight, validate_settings)
from megu_jax.unlearning.megu.labels import (draw_perturbing_labels, guided_distribution,
                                             perturbing_labels)
from megu_jax.unlearning.megu.method import (Guidance, machine_guidance, megu,
                                             receiving_retain_rows)
from megu_jax.unlearning.megu.targets import non_member_margin_targets
from megu_jax.unlearning.megu.steps import (MeguState, frozen_prefix, make_finetune_step,
                                            make_noise_step, noise_optimizers)

__all__ = ["FORGET_TARGETS", "LABEL_GUIDANCE", "LABEL_MODES", "NO_OP_VALUES", "NOISE_PER",
           "NOISE_SCHEDULES", "Guidance", "MeguState", "MissingTransitionFileError",
           "default_megu_config", "draw_perturbing_labels", "frozen_prefix", "guided_distribution",
           "machine_guidance", "make_finetune_step", "make_noise_step", "megu", "megu_settings",
           "non_member_margin_targets", "noise_optimizers", "noise_rows_per_sample",
           "own_class_weight", "perturbing_labels", "receiving_retain_rows", "validate_settings"]
