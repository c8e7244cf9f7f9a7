"""The front page and the docs: the README's code runs, every link resolves, the rendered
documents match their result files, the package is what it should be."""
import os
import pathlib
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

from megu_jax.harness import report

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def python_blocks(path):
  return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def test_the_readme_python_blocks_run_on_digits(tmp_path, monkeypatch):
  blocks = python_blocks(REPO / "README.md")
  assert blocks, "the README has no Python block"
  # The same code on the small data set: its config, its class names, a short recipe.
  on_digits = {
      "from megu_jax.configs import fashion_mnist":
          "from megu_jax.configs import digits as fashion_mnist",
      "fashion_mnist.get_config()": 'fashion_mnist.get_config("quick")',
      '("Shirt",)': '("3",)',
  }
  monkeypatch.chdir(tmp_path)
  for block in blocks:
    for before, after in on_digits.items():
      block = block.replace(before, after)
    exec(compile(block, "README.md", "exec"), {"__name__": "readme"})  # pylint: disable=exec-used
  assert (tmp_path / "runs" / "fmnist" / "final_metrics.json").exists()


_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.name)
def test_every_relative_link_resolves_inside_the_repository(document):
  broken = []
  for target in _LINK.findall(document.read_text()):
    if re.match(r"^[a-z]+://", target) or target.startswith(("#", "mailto:")):
      continue
    path = (document.parent / target.split("#")[0]).resolve()
    if not path.exists() or REPO not in path.parents and path != REPO:
      broken.append(target)
  assert not broken, f"{document.name}: {broken}"


def test_the_rendered_documents_match_their_result_files():
  assert report.stale(str(REPO)) == [], "run: python -m experiments.report"


def test_importing_the_library_leaves_the_environment_alone():
  # The dependencies first: importing jax and scikit-learn sets variables of their own
  # (TPU_SKIP_MDS_QUERY, KMP_DUPLICATE_LIB_OK...), which the test process may or may not have set
  # already, depending on which tests ran in it before. What changes after them is ours.
  code = ("import os; import jax, flax, optax, orbax.checkpoint, sklearn, matplotlib, tqdm; "
          "before = dict(os.environ); import megu_jax, megu_jax.train, "
          "megu_jax.unlearning, megu_jax.harness.experiment, megu_jax.harness.ensemble; "
          "after = dict(os.environ); "
          "print(sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k)))")
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        cwd=REPO, timeout=300, check=True,
                        env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})
  assert done.stdout.strip().splitlines()[-1] == "[]", done.stderr


def test_the_wheel_ships_the_configs_and_not_the_pytorch_twins(tmp_path):
  source = tmp_path / "source"
  source.mkdir()
  for name in ("setup.cfg", "pyproject.toml", "README.md"):
    shutil.copy(REPO / name, source / name)
  shutil.copytree(REPO / "megu_jax", source / "megu_jax",
                  ignore=shutil.ignore_patterns("__pycache__"))
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                  "--quiet", "-w", str(tmp_path / "dist"), str(source)], check=True,
                 capture_output=True, timeout=600)
  wheel, = (tmp_path / "dist").glob("megu_jax-*.whl")
  names = set(zipfile.ZipFile(wheel).namelist())
  assert {"megu_jax/configs/fashion_mnist.py", "megu_jax/configs/digits.py",
          "megu_jax/unlearning/megu/method.py", "megu_jax/harness/ensemble.py"} <= names
  assert not [n for n in names if "torch_reference" in n or n.startswith(("experiments/",
                                                                          "tests/"))]
