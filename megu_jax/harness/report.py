"""The documents rendered from result files: docs/results.md, docs/performance.md, README tables.

Every number in those documents comes from a JSON file under ``results/`` that a command wrote
(copied there unchanged), and each table carries that file's own provenance (command, commit,
date, machine). ``python -m experiments.report`` rewrites the documents; ``--check`` fails when
one is out of date with its results, which a test runs.

README blocks are delimited by ``<!-- rendered:NAME -->`` and ``<!-- /rendered:NAME -->``; the
text between them is replaced, everything else is left alone.
"""
from __future__ import annotations

import json
import os
import re
from typing import Callable

from megu_jax.harness import provenance

RESULTS_DIR = "results"
DEMO = os.path.join("demo", "results.json")
THROUGHPUT = os.path.join("performance", "throughput.json")
SCALING = os.path.join("performance", "scaling.json")
UNLEARNING_COST = os.path.join("performance", "unlearning_cost.json")
ENSEMBLE_TRAINING = os.path.join("performance", "ensemble_training.json")
MULTI_PROCESS = os.path.join("performance", "multi_process.json")
SCALING_PROCESSES = os.path.join("performance", "scaling_processes.json")
RECIPES = os.path.join("protocol", "recipes.json")


def load(results_dir: str, name: str) -> dict | None:
  path = os.path.join(results_dir, name)
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _percent(value) -> str:
  return "–" if value is None else f"{100 * value:.1f}"


def _seconds(value) -> str:
  return "–" if value is None else f"{value:.1f}"


def _provenance_line(record: dict | None, key: str = "provenance") -> str:
  return f"<sub>{provenance.describe((record or {}).get(key))}</sub>"


def _machine_provenance(record: dict) -> dict:
  """The provenance of the benchmark scripts, which keep it under ``machine``."""
  machine = record.get("machine", {})
  return {"command": machine.get("command"), "commit": machine.get("commit"),
          "dirty": machine.get("dirty"), "date": machine.get("date"),
          "machine": {"cpu_model": machine.get("cpu_model"),
                      "usable_cores": machine.get("usable_cores")},
          "versions": {"jax": machine.get("jax")}}


# --- the main job -----------------------------------------------------------------------------
DEMO_COLUMNS = (("retain_test_acc", "Dr"), ("forget_test_acc", "Df"),
                ("mia_entropy_lr", "MIA (entropy LR)"), ("related_test_acc", "related"),
                ("test_acc", "test"), ("time_s", "time (s)"))


def demo_table(demo: dict | None) -> str:
  if demo is None:
    return "_Not run yet: `make demo`, then copy `runs/demo/results.json` to `results/demo/`._\n"
  forget = ", ".join(demo["forget"]) or f"{demo['forget_size']} random samples"
  lines = [f"{demo['dataset']}, {demo['scenario']}, forget {forget}, seed {demo['seed']} "
           "(accuracies and MIA in %; Retrain's time is its training time):", "",
           "| method | " + " | ".join(title for _, title in DEMO_COLUMNS) + " |",
           "|---|" + "---|" * len(DEMO_COLUMNS)]
  for name, result in demo["methods"].items():
    cells = [(_seconds if key == "time_s" else _percent)(result.get(key))
             for key, _ in DEMO_COLUMNS]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  lines += ["", _provenance_line(demo)]
  return "\n".join(lines) + "\n"


# --- the protocol ------------------------------------------------------------------------------
def recipes_table(record: dict | None) -> str:
  if record is None:
    return "_Not measured yet: `python -m experiments.compare_recipes` (docs/usage.md)._\n"
  full = [row["images_seen"] for row in record["recipes"] if not row["train_subset"]]
  lines = ["| training images | epochs | images seen" + (" (× the full-set recipe's)" if full
                                                      else "")
           + " | accuracy on its training set | test accuracy | margin AUC (members vs test) | "
           "training time (s) |", "|---|---|---|---|---|---|---|"]
  for row in record["recipes"]:
    seen = f"{row['images_seen']:,}" + (f" ({row['images_seen'] / full[0]:.2f}×)" if full else "")
    lines.append(f"| {row['train_subset'] or 'all'} | {row['epochs']} | {seen} | "
                 f"{100 * row['train_acc']:.1f} | {100 * row['test_acc']:.1f} | "
                 f"{row['margin_auc']:.3f} | {row['time_s']:.0f} |")
  lines += ["", _provenance_line(record)]
  return "\n".join(lines) + "\n"


# --- performance --------------------------------------------------------------------------------
def throughput_table(record: dict | None) -> str:
  if record is None:
    return "_Not measured yet: `python -m experiments.bench_throughput`._\n"
  lines = ["| model, batch 128 | JAX step (img/s) | JAX, whole `fit` loop | PyTorch NCHW | "
           "PyTorch channels-last | JAX / best PyTorch | JAX compile (s) |",
           "|---|---|---|---|---|---|---|"]
  for name, result in record["results"].items():
    jax_rate = result["jax"]["images_per_s"]
    fit = result.get("jax_fit_loop", {}).get("images_per_s")
    nchw = result.get("torch_eager", {}).get("images_per_s")
    nhwc = result.get("torch_eager_channels_last", {}).get("images_per_s")
    ratio = result.get("ratio_jax_over_torch")
    lines.append(f"| {name} | {jax_rate:,.0f} | " + " | ".join(
        "–" if v is None else f"{v:,.0f}" for v in (fit, nchw, nhwc))
        + f" | {'–' if ratio is None else f'{ratio:.2f}×'} | {result['jax']['compile_s']:.1f} |")
  lines += ["", _bench_provenance_line(record)]
  return "\n".join(lines) + "\n"


def _bench_provenance_line(record: dict) -> str:
  """A benchmark's provenance line, with its peak memory and the load at its start and end."""
  return (_provenance_line({"provenance": _machine_provenance(record)})[:-len("</sub>")]
          + f"; peak resident memory {record.get('peak_rss_mb', '?')} MB; load average at "
          f"start {record['machine'].get('load_average_1_5_15')}, at end "
          f"{record['machine'].get('load_average_at_end')}</sub>")


def _and(items: list[str]) -> str:
  return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def scaling_measured(record: dict | None) -> str:
  """What ``scaling_table`` shows: "1 and 2 devices, mesh and pmap paths"."""
  if record is None:
    return "1 and 2 devices, mesh and pmap paths"
  modes = [m for m in ("mesh", "pmap") if any(m in r for r in record["results"].values())]
  devices = sorted({d for r in record["results"].values() for m in modes for d in r.get(m, {})},
                   key=int)
  return (f"{_and(devices)} device{'s' if devices != ['1'] else ''}, {_and(modes)} "
          f"path{'s' if len(modes) > 1 else ''}")


def scaling_table(record: dict | None) -> str:
  if record is None:
    return "_Not measured yet: `python -m experiments.bench_scaling`._\n"
  # The paths and device counts the file has (bench_scaling's --modes and --devices).
  results = record["results"].values()
  configs = [(mode, devices) for mode in ("mesh", "pmap")
             for devices in sorted({d for r in results for d in r.get(mode, {})}, key=int)]
  lines = ["| model, batch 128 global | " + " | ".join(f"{m}, {d} device{'s' if d != '1' else ''}"
                                                     for m, d in configs) + " |",
           "|---|" + "---|" * len(configs)]
  for name, result in record["results"].items():
    cells = []
    for mode, devices in configs:
      entry = result.get(mode, {}).get(devices)
      if entry is None or "images_per_s" not in entry:
        cells.append("–")
        continue
      speedup = entry.get("speedup_over_1_device")  # only where 1 device was measured too
      cells.append(f"{entry['images_per_s']:,.0f}" + ("" if devices == "1" or speedup is None
                                                       else f" ({speedup:.2f}×)"))
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  lines += ["", _bench_provenance_line(record)]
  return "\n".join(lines) + "\n"


MULTI_PROCESS_JOBS = {"train_original": "training, the original", "train_retrain":
                      "training, Retrain", "megu_noise": "MeGU, noise steps",
                      "megu_finetune": "MeGU, finetuning steps", "finetune": "Finetune"}


def _difference(value: float) -> str:
  return "0" if value == 0 else f"{value:.1e}"


def multi_process_equivalence_table(record: dict | None) -> str:
  """``experiments.compare_processes``: each job's per-step and final differences."""
  if record is None:
    return "_Not measured yet: `python -m experiments.compare_processes`._\n"
  reference, multi = record["reference"], record["multi_process"]
  lines = [f"{record['dataset']} (`{record['config']}`, {record['epochs']} epoch"
           f"{'s' if record['epochs'] != 1 else ''}), {multi['processes']} processes × "
           f"{multi['devices_per_process']} devices against 1 process × {reference['devices']} "
           "devices. Per step: the largest difference of any metric the step returns (its losses; "
           "training's batch accuracy too) over every process; at the end: the job's accuracies "
           "and other metrics (timings left out):", "",
           "| job | steps | per step: largest difference | largest relative difference | "
           "accuracies | other metrics: largest difference | from |",
           "|---|---|---|---|---|---|---|"]
  order = [j for j in MULTI_PROCESS_JOBS if j in record["jobs"]]
  for job in order + sorted(set(record["jobs"]) - set(order)):
    entry = record["jobs"][job]
    steps = f"{entry['steps']}" + ("" if entry["same_steps"] else " (not the same steps)")
    count = len(entry["accuracies"])
    equal = (("both" if count == 2 else f"all {count}") + " equal" if entry["accuracies_equal"] else
             "differ: " + ", ".join(entry["unequal_accuracies"]))
    lines.append(f"| {MULTI_PROCESS_JOBS.get(job, job)} | {steps} | "
                 f"{_difference(entry['max_abs_loss_diff'])} | "
                 f"{_difference(entry['max_rel_loss_diff'])} | {equal} | "
                 f"{_difference(entry['max_abs_other_metric_diff'])} | `{entry['file']}` |")
  lines += ["", _provenance_line(record)]
  return "\n".join(lines) + "\n"


def multi_process_overhead_table(record: dict | None) -> str:
  """``experiments.bench_scaling --processes=1,2``: each layout beside one process with as many
  devices."""
  if record is None or not record.get("multi_process"):
    return ("_Not measured yet: `python -m experiments.bench_scaling --modes=mesh --devices=2,4 "
            "--processes=1,2 --out=results/performance/scaling_processes.json`._\n")
  lines = ["| model, batch 128 global | path | devices (processes × devices each) | 1 process "
           "(img/s) | several processes (img/s) | step time, several processes / 1 |",
           "|---|---|---|---|---|---|"]
  for name, by_mode in record["multi_process"].items():
    for mode, by_layout in by_mode.items():
      for entry in by_layout.values():
        one = entry.get("one_process_images_per_s")
        ratio = entry.get("step_time_vs_one_process")
        lines.append(f"| {name} | {mode} | {entry['devices']} ({entry['processes']} × "
                     f"{entry['devices_per_process']}) | "
                     f"{'–' if one is None else f'{one:,.0f}'} | {entry['images_per_s']:,.0f} | "
                     f"{'–' if ratio is None else f'{ratio:.2f}'} |")
  lines += ["", _bench_provenance_line(record)]
  return "\n".join(lines) + "\n"


def unlearning_cost_table(record: dict | None) -> str:
  if record is None:
    return "_Not measured yet: `python -m experiments.bench_unlearning`._\n"
  lines = ["| method | time (s, no compile) | share of Retrain's training | with compilation |",
           "|---|---|---|---|"]
  for name, stats in sorted(record["summary"].items(),
                            key=lambda item: item[1]["relative_to_retrain"]["mean"]):
    lines.append(f"| {name} | {stats['time_s']['mean']:.1f} | "
                 f"{100 * stats['relative_to_retrain']['mean']:.1f} % | "
                 f"{100 * stats['relative_to_retrain_with_compile']['mean']:.1f} % |")
  phases = [cell["megu"]["phases"] for cell in record["cells"].values()
            if "megu" in cell and "phases" in cell["megu"]]
  if phases:
    shares = phases[0]["shares"]
    lines += ["", "MeGU's time by phase (first cell): " + ", ".join(
        f"{name[:-2]} {phases[0][name]:.2f} s ({100 * share:.0f} %)"
        for name, share in shares.items()) + "."]
  source = record.get("source", {})
  lines += ["", f"<sub>cells: {', '.join(record['cells'])}; source: "
            f"{', '.join(f'{k}={v}' for k, v in source.items())}</sub>",
            _provenance_line({"provenance": _machine_provenance(record)})]
  return "\n".join(lines) + "\n"


def ensemble_training_table(record: dict | None) -> str:
  if record is None:
    return "_Not measured yet: `python -m experiments.bench_ensemble_training`._\n"
  lines = ["| model | models at once | one after another (img/s) | vmapped group (img/s) | "
           "group / sequential |", "|---|---|---|---|---|"]
  for name, entry in record["results"].items():
    for size, row in entry.items():
      lines.append(f"| {name} | {size} | {row['sequential_images_per_s']:,.0f} | "
                   f"{row['vmap_images_per_s']:,.0f} | {row['vmap_over_sequential']:.2f}× |")
  lines += ["", _provenance_line({"provenance": _machine_provenance(record)})]
  return "\n".join(lines) + "\n"


# --- documents ----------------------------------------------------------------------------------
_GENERATED = ("<!-- Rendered by `python -m experiments.report` from results/*.json: edit the "
              "renderer (megu_jax/harness/report.py) or rerun the commands, not this file. -->\n")


def performance_md(results_dir: str) -> str:
  return _GENERATED + f"""
# Performance

Four scripts measure speed; each prints its figures and writes a JSON under
`results/performance/` with the machine's CPU model, core count, load average at start and end,
library versions, command, commit and date, and the process's peak resident memory.

```bash
pip install -e '.[bench]' --extra-index-url https://download.pytorch.org/whl/cpu  # optional: torch
python -m experiments.bench_throughput    # results/performance/throughput.json
python -m experiments.bench_scaling       # results/performance/scaling.json
python -m experiments.bench_ensemble_training   # results/performance/ensemble_training.json
python -m experiments.bench_unlearning --config=megu_jax/configs/fashion_mnist.py \\
    --workdir=runs/bench_unlearning --config.methods=all  # results/performance/unlearning_cost.json
```

A fifth, `python -m experiments.compare_processes` (`results/performance/multi_process.json`),
measures no speed: whether several processes compute what one does ([below](#multi-process)).

## Train-step throughput

Our train step (`train.make_train_step` on one device, state donated, batches already on the
device) against its PyTorch twin (`experiments/torch_reference.py`: the same layers starting from
the same weights, copied from the Flax initialisation; the same optimiser; a test checks that both
compute the same losses and updates), batch 128, float32. JAX's compile time is timed apart; then
blocks of 10 steps alternate between JAX, PyTorch NCHW and PyTorch channels-last, and the median
block is the figure, so that a change of load hits both frameworks alike.

{throughput_table(load(results_dir, THROUGHPUT))}
## Scaling over devices

Images per second on {scaling_measured(load(results_dir, SCALING))}, each configuration in
its own subprocess (the fake CPU device count is fixed when JAX starts), configurations
alternating over rounds. On a CPU the "devices" share the same cores, so this shows that the
data-parallel paths cost nothing, not that they speed anything up.

{scaling_table(load(results_dir, SCALING))}
## Multi-process

The same program as several processes joined by `jax.distributed` ([scaling.md](scaling.md)),
here on one machine through `experiments.launch`: the same global devices, batch and seed as one
process, gradients reduced across the processes by gloo over 127.0.0.1.

**Do they compute the same thing?** `python -m experiments.compare_processes` trains the digits
recipe's original and Retrain model in either layout, then unlearns from the same (one-process)
models in either layout, recording every compiled step's metrics:

{multi_process_equivalence_table(load(results_dir, MULTI_PROCESS))}
What differs between the layouts is the order of the cross-device reductions (one process's
all-reduce against gloo's across processes), which moves the last float32 bits of a step's
result; the data each device sees is the same.

**What does going through several processes cost?** The train step alone (as above), as several
processes with the same global device count, beside one process
(`python -m experiments.bench_scaling --models=small_cnn,resnet18_narrow --modes=mesh --devices=2,4 --processes=1,2 --out=results/performance/scaling_processes.json`):

{multi_process_overhead_table(load(results_dir, SCALING_PROCESSES))}
This is the price of one machine pretending to be several, on cores the processes share: the
gradients' all-reduce goes through gloo over TCP, a fixed cost per step that weighs most on a
short step. It is neither a speed-up (on one machine, one process with every device is the
faster way) nor a prediction for hosts with their own accelerators and network.

## Training an ensemble: one after another, or several at once

An ensemble's models can be trained one after another or several at once, vmapped over a models
axis (`megu_jax/ensemble_training.py`, `config.ensemble_training`). Both give the same models
(a test bounds the difference on digits); the whole training loop, median of alternating runs,
counting every model's images:

{ensemble_training_table(load(results_dir, ENSEMBLE_TRAINING))}
On XLA:CPU the vmapped convolutions become grouped convolutions, which are slower than the same
convolutions one model at a time; the default on CPU is therefore `sequential`. On accelerators
small models usually gain from `vmap`.

## Unlearning cost

Every method's time without compilation relative to Retrain's training time in the same run, and
with compilation. Run on its own (`--config`), the benchmark calls every method and Retrain twice
with the same key: the time is the second call's work, and the share with compilation compares
the first calls' wall times, which also pay for compiling every operation outside the compiled
steps. MeGU's time by phase (transition: the original's pass over the forget images, T and the
perturbing labels; stand-in: the heads retrained for the margin targets and their scoring; noise
optimisation; finetuning; other: set-up and host work).

{unlearning_cost_table(load(results_dir, UNLEARNING_COST))}
## Where the time goes

- What is ours is in place: the step compiles once (`tests/test_throughput.py` counts every XLA
  compilation during a two-epoch `train.fit`), the state is donated, metrics are fetched one step
  late so the host never waits for the step it just dispatched, and the host places batch n+1
  while the device runs step n.
- On XLA:CPU the convolutions bound the step. For a kernel gradient XLA lays each saved
  activation out as [channels, height, width, batch] and its fusion pass recomputes the
  BatchNorm → ReLU → residual chain inside that transpose; on the narrow ResNet-18 these
  transposes take more time than the convolutions. An optimisation barrier, im2col + matmul
  convolutions and kernel gradients as shifted dot products were each measured slower on this
  CPU, and none of them is in the code.
- jaxlib 0.10 hands convolutions to YNNPACK, slower than XLA's own for our 16–128-channel layers:
  the commands therefore add `--xla_cpu_experimental_ynn_fusion_type=-individual_convolution` to
  `XLA_FLAGS` before JAX starts (`megu_jax/xla_cpu.py`; never over a user's own setting, off with
  `MEGU_JAX_XLA_CPU_DEFAULTS=0`; `import megu_jax` itself changes nothing).
- Two-by-two max-pooling is written as reshape + max, whose gradient is cheaper than XLA's
  select-and-scatter on this CPU (a test checks they compute the same function).
"""


ABLATIONS_DIR = "ablations"


def development_section(results_dir: str) -> str:
  """MeGU's variants on the development rows: every committed ``ablations.json`` under
  ``results/ablations/NAME/``, in name order, as ``experiments.ablations`` renders it, after
  the ``reading.md`` beside it (prose without figures: the figures are the table's)."""
  from megu_jax.harness import ablations  # noqa: PLC0415 (it imports the experiment stack)
  root = os.path.join(results_dir, ABLATIONS_DIR)
  names = sorted(os.listdir(root)) if os.path.isdir(root) else []
  lines = ["## MeGU on the development rows", "",
           "Variants of MeGU's settings (`python -m experiments.ablations`, docs/usage.md), each "
           "run once from every original of a development row and scored per example against "
           "the oracles, beside doing nothing and the floor. Defaults are chosen on these rows "
           "only ([method.md §4](method.md)). A table's *megu (defaults)* row is MeGU's defaults "
           "as they were when that table ran (its last line names the commit); the "
           "Fashion-MNIST config states the current ones and the table each comes from.", ""]
  if not names:
    return "\n".join(lines + ["_Nothing committed yet under `results/ablations/`._", ""])
  for name in names:
    summary = load(results_dir, os.path.join(ABLATIONS_DIR, name, "ablations.json"))
    if summary is None:
      continue
    title, *body = ablations.markdown(summary).splitlines()
    # Its title as this subsection's, its row headings two levels down.
    lines += [f"### {title.lstrip('# ')} (`{name}`)", ""]
    reading = os.path.join(root, name, "reading.md")  # a few sentences, written by hand
    if os.path.exists(reading):
      with open(reading, encoding="utf-8") as f:
        lines += [f.read().strip(), ""]
    while body and not body[0].strip():
      body.pop(0)
    lines += ["##" + line if line.startswith("## ") else line for line in body]
    lines.append("")
  return "\n".join(lines)


def development_rows() -> tuple[str, ...]:
  """The Fashion-MNIST development rows as the all-class table labels them."""
  from megu_jax.configs import fashion_mnist  # noqa: PLC0415
  return row_labels(fashion_mnist.DEVELOPMENT_ROWS)


def all_class_rows() -> tuple[str, ...]:
  """Every row of the Fashion-MNIST all-class table, labelled as the table labels them."""
  from megu_jax.configs import fashion_mnist  # noqa: PLC0415
  return row_labels(fashion_mnist.ALL_CLASS_ROWS)


def row_labels(scenarios: str) -> tuple[str, ...]:
  """``"full_class:Shirt;random:100@1"`` -> ``("full_class Shirt", "random 100 @1")``."""
  from megu_jax.harness import benchmark  # noqa: PLC0415
  return tuple(f"{scenario} {what.replace('@', ' @')}"
               for scenario, what in benchmark.parse_scenarios(scenarios))


def results_md(results_dir: str) -> str:
  from megu_jax.harness import ensemble_report  # noqa: PLC0415 (it imports numpy and plots)
  return _GENERATED + f"""
# Results

How a result is judged is in [method.md §4](method.md); what was tried before this yardstick, on
the retired protocol, is in [tuning.md](tuning.md).

## The protocol: an original that memorises

A per-example test can only see membership where the original model remembers its training
images. The Fashion-MNIST recipe therefore trains on a fixed, class-balanced subset, long enough
to fit it completely. The recipes measured (cost is the images a training sees; the training
times are comparable only within one run on quiet cores, and the load is in the line below):

{recipes_table(load(results_dir, RECIPES))}
{ensemble_report.headline_section(results_dir)}
{development_section(results_dir)}
{ensemble_report.all_class_section(results_dir, development_rows(), all_class_rows())}
## The main job (`make demo`)

{demo_table(load(results_dir, DEMO))}"""


README_BLOCKS: dict[str, Callable[[str], str]] = {}


def _readme_demo(results_dir: str) -> str:
  return demo_table(load(results_dir, DEMO))


def _readme_headline(results_dir: str) -> str:
  from megu_jax.harness import ensemble_report  # noqa: PLC0415
  return ensemble_report.headline_summary(results_dir)


def _readme_all_class(results_dir: str) -> str:
  from megu_jax.harness import ensemble_report  # noqa: PLC0415
  return ensemble_report.all_class_tally(results_dir, development_rows(), all_class_rows())


README_BLOCKS.update(demo=_readme_demo, headline=_readme_headline, all_class=_readme_all_class)


def render_readme(text: str, results_dir: str) -> str:
  """``text`` with every ``rendered:NAME`` block replaced by its rendering."""
  def replace(match: re.Match) -> str:
    name = match.group(1)
    if name not in README_BLOCKS:
      raise ValueError(f"README block 'rendered:{name}' has no renderer; known: "
                       f"{sorted(README_BLOCKS)}")
    return (f"<!-- rendered:{name} -->\n{README_BLOCKS[name](results_dir).rstrip()}\n"
            f"<!-- /rendered:{name} -->")
  return re.sub(r"<!-- rendered:(\w+) -->.*?<!-- /rendered:\1 -->", replace, text, flags=re.S)


def documents(root: str) -> dict[str, str]:
  """Path -> rendered content of every rendered document under the repository ``root``."""
  results_dir = os.path.join(root, RESULTS_DIR)
  with open(os.path.join(root, "README.md"), encoding="utf-8") as f:
    readme = f.read()
  return {os.path.join(root, "README.md"): render_readme(readme, results_dir),
          os.path.join(root, "docs", "results.md"): results_md(results_dir),
          os.path.join(root, "docs", "performance.md"): performance_md(results_dir)}


def stale(root: str) -> list[str]:
  """The rendered documents whose committed text differs from a fresh rendering."""
  out = []
  for path, text in documents(root).items():
    current = open(path, encoding="utf-8").read() if os.path.exists(path) else None
    if current != text:
      out.append(path)
  return out


def write(root: str) -> list[str]:
  from megu_jax import io_utils  # noqa: PLC0415
  written = []
  for path, text in documents(root).items():
    io_utils.atomic_write_text(path, text)
    written.append(path)
  return written
