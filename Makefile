# certfleet: `make demo` runs the end-to-end demo, `make test` runs lint, types and tests.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck pytest system-deps bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,fast]'
	touch $(STAMP)

# Debian packages the tests and benchmarks use: mosquitto and nginx (interop), openssl (verify,
# OCSP), chromium + chromium-driver (the web console's browser tests), prometheus (promtool:
# the alerting rules in contrib/prometheus/), nats-server (the cluster), softhsm2 (CA keys in a
# PKCS#11 token: tests/softhsm.py), strongswan-pki + libstrongswan-extra-plugins (its curl
# transport) and curl (EST interop: tests/registry/test_est_interop.py).
system-deps:
	@command -v mosquitto >/dev/null 2>&1 && command -v openssl >/dev/null 2>&1 && \
	  command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 && \
	  { command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; } && \
	  { command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ]; } && \
	  command -v promtool >/dev/null 2>&1 && command -v softhsm2-util >/dev/null 2>&1 && \
	  command -v pki >/dev/null 2>&1 && command -v curl >/dev/null 2>&1 && \
	  [ -e /usr/lib/ipsec/plugins/libstrongswan-curl.so ] || \
	  { if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	        mosquitto openssl nginx chromium chromium-driver prometheus nats-server softhsm2 \
	        strongswan-pki libstrongswan-extra-plugins curl >/dev/null; \
	    else echo "note: mosquitto/openssl/nginx/chromium/promtool/nats-server/softhsm2/strongswan-pki/curl missing and cannot install them; those tests will skip"; fi; }

demo: $(STAMP)
	$(BIN)/certfleet demo

lint: $(STAMP)
	$(BIN)/ruff check fleetcore factory broker registry device_sim certfleet tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

# First, in parallel (xdist, $(PYTEST_WORKERS) workers), every test not marked `alone`; then, one
# at a time, the tests marked `alone` (they assert wall-clock bounds that assume the cores to
# themselves; see docs/testing.md). Both phases always run.
PYTEST_WORKERS ?= 6
pytest: $(STAMP) system-deps
	@$(BIN)/pytest -n $(PYTEST_WORKERS) -m 'not alone'; shared=$$?; \
	  $(BIN)/pytest -m alone; alone=$$?; \
	  test $$shared -eq 0 && test $$alone -eq 0

test: lint typecheck pytest

clean:
	rm -rf $(VENV) certfleet-data .pytest_cache .mypy_cache .ruff_cache
