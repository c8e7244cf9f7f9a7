"""Figures for reports: plain functions that draw with matplotlib's Agg canvas and write a file.

They build a ``matplotlib.figure.Figure`` directly (no pyplot), so they never touch a global backend
or figure registry and are safe to call from scripts, tests and threads alike.
"""
from __future__ import annotations

import io
from typing import Any, Optional, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from megu_jax import io_utils


def plot_transition_heatmap(T: Any, class_names: Sequence[str], path: str,
                            title: Optional[str] = None) -> str:
  """Draws the transition matrix as an annotated heatmap and writes it atomically as PNG.

  Args:
    T: [K, K] transition matrix (rows: the forget sample's class, columns: perturbing class).
    class_names: K names, in label order.
    path: destination .png file; written via a temporary file and os.replace.
    title: optional figure title.

  Returns:
    ``path``.
  """
  matrix = np.asarray(T, dtype=np.float64)
  if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
    raise ValueError(f"T must be a square [K, K] matrix, got shape {matrix.shape}")
  if len(class_names) != matrix.shape[0]:
    raise ValueError(f"{len(class_names)} class names for a {matrix.shape[0]} x "
                     f"{matrix.shape[0]} matrix")
  num_classes = matrix.shape[0]
  side = min(24.0, 2.0 + 0.55 * num_classes)
  figure = Figure(figsize=(side + 1.5, side), dpi=100)
  FigureCanvasAgg(figure)
  axes = figure.add_subplot()
  image = axes.imshow(matrix, cmap="viridis", vmin=0.0, vmax=max(float(matrix.max()), 1e-12))
  figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="transition probability")
  axes.set_xticks(range(num_classes), labels=class_names, rotation=60, ha="right")
  axes.set_yticks(range(num_classes), labels=class_names)
  axes.set_xlabel("perturbing class")
  axes.set_ylabel("class of the forget sample")
  if num_classes <= 20:  # Beyond that the numbers no longer fit in their cells.
    threshold = 0.5 * matrix.max()
    for i in range(num_classes):
      for j in range(num_classes):
        axes.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=8,
                  color="black" if matrix[i, j] > threshold else "white")
  if title:
    axes.set_title(title)
  figure.tight_layout()
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png")
  io_utils.atomic_write_bytes(path, buffer.getvalue())
  return path
