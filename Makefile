# The README's two commands:  make demo  (set up + run the main job)   make test  (set up + run the tests)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: demo test test-fast venv clean

venv: $(STAMP)

# Re-install only when the project's dependencies change.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,tune,track]'
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q

# Unit tests only: no multi-process, service or slow tests.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not multiprocess and not service"

demo: $(STAMP)
	$(PY) -m pipeline.demo

clean:
	rm -rf $(VENV) demo_out runs
