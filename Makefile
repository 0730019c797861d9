# The two commands: `make demo` and `make test`. Each sets itself up from nothing
# but Python 3.11+ and make: the virtual environment and every package are part
# of the command, and a second run reuses what the first installed.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: demo test lint fmt bench clean system-tools

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "Python 3.11+ is required")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

## demo: embedded broker, bridge + API on SQLite, one synthetic kiosk, live page
demo: $(STAMP)
	$(BIN)/vitals-bridge demo

# Tools some tests drive: Debian's Chromium (browser tests), systemd-analyze (unit
# files) and mosquitto (private brokers). Installed when missing and we are root
# with apt, as on CI; elsewhere the tests that need them skip with a reason.
SYSTEM_TOOLS := chromium:chromium systemd-analyze:systemd mosquitto:mosquitto openssl:openssl
system-tools:
	@missing=""; for pair in $(SYSTEM_TOOLS); do \
	  command -v $${pair%%:*} >/dev/null || missing="$$missing $${pair##*:}"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "not installed:$$missing (their tests will skip)"; fi; fi

## test: lint, format check, type check and the whole test suite
test: $(STAMP) system-tools
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

fmt: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache .hypothesis
