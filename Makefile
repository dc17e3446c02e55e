# Two entry points: `make pipeline` and `make test`. Each sets up .venv first if needed.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
SET ?=
UI ?=

.PHONY: setup pipeline ui plots-offline test test-long test-team lint clean-venv

$(BIN)/python:
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet -c constraints.txt -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $@

setup: $(VENV)/.installed

# make pipeline                      -> dvc repro with params.yaml as it is
# make pipeline SET="k=v k2=v2"      -> dvc exp run -S k=v -S k2=v2 (an experiment with those changes)
# Before the first run there is no dvc.lock, and `dvc exp run` warns once per output that it has
# no hash to check out: nothing to act on, so those lines are left out.
pipeline: $(VENV)/.installed
ifeq ($(strip $(SET)),)
	PATH="$(CURDIR)/$(BIN):$$PATH" dvc repro
else
	@echo "dvc exp run $(foreach s,$(SET),-S '$(s)')"
	@PATH="$(CURDIR)/$(BIN):$$PATH" dvc exp run $(foreach s,$(SET),-S '$(s)') \
	  2> >(sed -u '/No file hash info found/d' >&2)
endif

# mlflow ui on the project's store (UI="--port 5001" adds options), after a link to the experiment's training
# runs. MLflow's server imports starlette's deprecated WSGI middleware, which warns once per worker: MLflow's
# to change, not yours, so that one is hidden.
ui: $(VENV)/.installed
	@$(BIN)/python tools/ui_link.py $(UI)
	PYTHONWARNINGS="ignore:starlette.middleware.wsgi is deprecated" $(BIN)/mlflow ui \
	  --backend-store-uri sqlite:///mlflow.db $(UI)

# The `dvc plots` page loads vega, vega-lite and vega-embed from a CDN; this inlines them (from the npm
# registry, once) into .dvc/plots/offline.html and sets it in .dvc/config.local, for a browser offline.
plots-offline: $(VENV)/.installed
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python tools/offline_plots.py

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The suite, less the team tests, which start real servers (sshd, PostgreSQL, mlflow server, an S3 API), and
# the long ones (a minute or more each); each group runs on its own. .ci/run runs all three.
test: lint
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -m "not team and not long"

test-long: $(VENV)/.installed-test
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -m long

test-team: $(VENV)/.installed-test
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -m team

clean-venv:
	rm -rf $(VENV)
