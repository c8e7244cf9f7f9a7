"""Reports of an unlearning run: the comparison table (Markdown) and the per-class accuracy plot."""
from __future__ import annotations

import io
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from megu_jax import io_utils  # noqa: E402

# Column order of the unlearning literature: Dr, Df, MIA, avg gap, time; then what we add.
TABLE_COLUMNS = (
    ("retain_test_acc", "Dr"), ("forget_test_acc", "Df"), ("mia_entropy_lr", "MIA (entropy LR)"),
    ("avg_gap", "avg gap"), ("time_s", "time (s)"), ("related_test_acc", "related"),
    ("probe_forget_acc", "probe Df"), ("mia_confidence_svc", "MIA-efficacy (SVC)"),
    ("retain_train_acc", "Dr train"), ("forget_train_acc", "Df train"), ("test_acc", "test"),
)


def format_value(key: str, value) -> str:
  if value is None or (isinstance(value, float) and not np.isfinite(value)):
    return "–"
  if key == "time_s":
    return f"{value:.1f}"
  return f"{100 * value:.1f}"  # fractions are shown as percentages


def results_markdown(summary: Mapping) -> str:
  """The table of one run (``results.json``'s content) with a short header."""
  forget = ", ".join(summary["forget"]) or f"{summary['forget_size']} random samples"
  lines = [
      f"# Unlearning on {summary['dataset']}: {summary['scenario']}, forget {forget}, "
      f"seed {summary['seed']}",
      "",
      "Accuracies and MIA scores in %; Retrain is the target. `related`: "
      f"{summary.get('related', '')}. T: {summary['transition']['oracle']} "
      f"({summary['transition']['path']}). Retrain's time is its training time.",
      "",
      "| method | " + " | ".join(title for _, title in TABLE_COLUMNS) + " |",
      "|---|" + "---|" * len(TABLE_COLUMNS),
  ]
  for name, result in summary["methods"].items():
    lines.append(f"| {name} | " + " | ".join(format_value(key, result.get(key))
                                              for key, _ in TABLE_COLUMNS) + " |")
  return "\n".join(lines) + "\n"


def plot_per_class_accuracy(per_class: Mapping[str, np.ndarray], class_names: Sequence[str],
                            path: str, title: str | None = None) -> str:
  """Grouped bars: test accuracy of each class for each method (e.g. original/retrain/megu)."""
  names = list(per_class)
  k = len(class_names)
  width = 0.8 / max(1, len(names))
  fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * k), 3.8))
  for i, name in enumerate(names):
    ax.bar(np.arange(k) + (i - (len(names) - 1) / 2) * width, 100 * np.asarray(per_class[name]),
           width, label=name)
  ax.set_xticks(np.arange(k))
  ax.set_xticklabels(class_names, rotation=30, ha="right")
  ax.set_ylabel("test accuracy (%)")
  ax.set_ylim(0, 100)
  ax.legend(loc="lower right", fontsize="small")
  if title:
    ax.set_title(title)
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=120)
  plt.close(fig)
  io_utils.atomic_write_bytes(path, buffer.getvalue())
  return path
