"""Reports of an unlearning run: the comparison table (Markdown) and the per-class accuracy plot."""
from __future__ import annotations

import io
import os
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
  return _save(fig, path)


def _save(fig, path: str) -> str:
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=120)
  plt.close(fig)
  io_utils.atomic_write_bytes(path, buffer.getvalue())
  return path


def plot_benchmark(benchmark: Mapping, directory: str) -> list[str]:
  """Dr against Df (Retrain marked), MIA per method, time per method (log scale), per scenario."""
  summary = benchmark["summary"]
  labels = list(summary)
  mean = lambda stats, key: 100 * stats[key]["mean"] if key in stats else np.nan
  paths = []

  fig, axes = plt.subplots(1, len(labels), figsize=(4.2 * len(labels), 3.8), squeeze=False)
  for ax, label in zip(axes[0], labels):
    for method, stats in summary[label].items():
      marker = "*" if method == "retrain" else "o"
      ax.scatter(mean(stats, "forget_test_acc"), mean(stats, "retain_test_acc"), marker=marker,
                 s=160 if method == "retrain" else 40, zorder=3)
      ax.annotate(method, (mean(stats, "forget_test_acc"), mean(stats, "retain_test_acc")),
                  fontsize="x-small", xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("Df: forget accuracy (%)")
    ax.set_ylabel("Dr: retain test accuracy (%)")
    ax.set_title(label, fontsize="small")
    ax.grid(alpha=0.3)
  fig.tight_layout()
  paths.append(_save(fig, os.path.join(directory, "dr_vs_df.png")))

  for key, name, ylabel, log in (("mia_entropy_lr", "mia.png", "MIA, entropy LR (%)", False),
                                 ("time_s", "time.png", "unlearning time (s)", True)):
    methods = list(benchmark["methods"])
    width = 0.8 / max(1, len(labels))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.8 * len(methods) * len(labels)), 3.8))
    for i, label in enumerate(labels):
      values = [summary[label].get(m, {}).get(key, {}).get("mean", np.nan) for m in methods]
      values = np.asarray(values, float) * (1 if key == "time_s" else 100)
      ax.bar(np.arange(len(methods)) + (i - (len(labels) - 1) / 2) * width, values, width,
             label=label)
    ax.set_xticks(np.arange(len(methods)))
    ax.set_xticklabels(methods, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    if log:
      ax.set_yscale("log")
    ax.legend(fontsize="x-small")
    fig.tight_layout()
    paths.append(_save(fig, os.path.join(directory, name)))
  return paths
