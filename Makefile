# The two Quickstart commands. Both create .venv when it is missing and install into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fastross-installed
# pytest-xdist workers for make test (tests/conftest.py keeps the tests that read one shared run on one worker)
TEST_WORKERS ?= 2

.PHONY: demo test install clean

$(STAMP): pyproject.toml CMakeLists.txt $(wildcard native/*.cpp native/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

demo: $(STAMP)
	$(PY) -m fastross.demo

clean:
	rm -rf runs/demo .pytest_cache
