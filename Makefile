# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv when missing, install the requirements, fetch Debian's
# Fashion-MNIST package when its files are missing (and apt-get is usable), then run.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
FMNIST_DIR := /usr/share/datasets/fashion-mnist
STAMP := $(VENV)/.installed

.PHONY: demo test venv data clean-venv

$(STAMP): requirements.txt setup.cfg
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# Debian ships the real Fashion-MNIST IDX files; nothing is downloaded at run time.
data:
	@if [ -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  echo "Installing Debian's dataset-fashion-mnist"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	else \
	  echo "Fashion-MNIST files are missing under $(FMNIST_DIR) and apt-get is not usable;"; \
	  echo "install the Debian package dataset-fashion-mnist or pass --config.data_dir."; \
	fi

demo: venv data
	$(PY) -m experiments.unlearn --config=megu_jax/configs/fashion_mnist.py --workdir=runs/demo

test: venv data
	$(PY) -m pytest -q -n 2 tests

clean-venv:
	rm -rf $(VENV)
