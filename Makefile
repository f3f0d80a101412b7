# Everything installs into .venv from the package registry; torch is pinned to the CPU build on disk.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PROMPT ?= Write a Python function that returns the n-th Fibonacci number.

.PHONY: setup demo lint test test-slow test-fuzz test-ray fault-campaign screenshot clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: setup
	$(VENV)/bin/qwenvl run -p "$(PROMPT)" --temperature 0 --max-tokens 160

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# Two pytest-xdist workers, a test file each at a time (the suite is mostly single-threaded Python:
# two workers keep both cores of a 2-core machine busy; tests/conftest.py gives each worker its share).
test: setup lint
	$(PY) -m pytest -q -n 2 --dist loadfile

test-slow: setup
	$(PY) -m pytest -q -n 2 --dist loadfile -m slow

test-ray: setup
	$(PY) -m pytest -q -m ray

# The README's picture of the chat page, taken by the browser test that draws grounding boxes.
screenshot: setup
	QWENVL_SCREENSHOT=docs/chat-page.png $(PY) -m pytest -q tests/test_chat_page.py -k grounding_is_drawn

test-fuzz: setup
	$(PY) -m pytest -q -m fuzz

fault-campaign: setup
	$(PY) scripts/fault_campaign.py

clean:
	rm -rf $(VENV)
