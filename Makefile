# The README's quick start: `make demo` and `make test`. Both install whatever is missing.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install system-deps demo sandbox screenshots test test-kind test-weaviate lint bench clean

install: system-deps $(STAMP)

# Debian packages the runbooks and their tests use; installed only when missing (needs root, as on CI).
system-deps:
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v zstd >/dev/null || missing="$$missing zstd"; \
	[ -x "$$(pg_config --bindir 2>/dev/null)/initdb" ] || missing="$$missing postgresql-15 postgresql-client-15"; \
	command -v prometheus >/dev/null || missing="$$missing prometheus"; \
	command -v prometheus-alertmanager >/dev/null || missing="$$missing prometheus-alertmanager"; \
	command -v prometheus-pushgateway >/dev/null || missing="$$missing prometheus-pushgateway"; \
	[ -x /usr/sbin/sshd ] || missing="$$missing openssh-server"; \
	[ -x /usr/sbin/nginx ] || missing="$$missing nginx"; \
	command -v prometheus-postgres-exporter >/dev/null || missing="$$missing prometheus-postgres-exporter"; \
	[ -x /usr/sbin/logrotate ] || missing="$$missing logrotate"; \
	command -v openssl >/dev/null || missing="$$missing openssl"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

# pip bootstraps uv at its locked version; uv installs exactly the locked trees (they are whole: --no-deps) from
# PyPI, byte-compiled as pip did (the postgres OS user runs wal-push from these packages and cannot write .pyc).
# UV_SYSTEM_CERTS: uv trusts the system's certificate store, as pip does (a proxy's CA, where there is one).
UV := UV_SYSTEM_CERTS=$${UV_SYSTEM_CERTS:-true} $(VENV)/bin/uv pip install -q --python $(PY) --no-deps

$(STAMP): pyproject.toml requirements.lock requirements-dev.lock tasks/_dumpscan.c
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --no-deps "$$(grep '^uv==' requirements-dev.lock)"
	$(UV) --compile-bytecode -r requirements.lock -r requirements-dev.lock
	$(UV) -e .
	@touch $(STAMP)

demo: install
	$(VENV)/bin/runbooks demo

# The Prefect UI on http://127.0.0.1:4200 over throwaway services with seeded data; Ctrl-C removes it all.
sandbox: install
	$(VENV)/bin/runbooks sandbox

# The browser suite, its screenshots written into docs/screenshots (the pictures the docs show).
screenshots: install
	RUNBOOKS_SCREENSHOT_DIR=docs/screenshots $(PY) -m pytest -q -x -p no:cacheprovider tests/test_browser_ui.py

# Every test that this machine can run; none is skipped (a skip fails the run). The suites that need a real
# Kubernetes cluster or Weaviate are deselected (the summary says so) and run with the two targets below.
test: install
	$(VENV)/bin/ruff check .
	RUNBOOKS_NO_SKIP=1 $(PY) -m pytest -q -rs -x -p no:cacheprovider --durations=25

# The `kind` suite: the Kubernetes runbooks' scenarios against the disposable cluster $KUBECONFIG points at.
test-kind: install
	@test -n "$$KUBECONFIG" || { echo "make test-kind: set KUBECONFIG to a disposable cluster (kind create cluster)"; exit 2; }
	$(PY) -m pytest -q -rs -p no:cacheprovider -m kind

# A real Weaviate (a disposable server with a backup module): WEAVIATE_URL, WEAVIATE_API_KEY, WEAVIATE_BACKEND.
test-weaviate: install
	@test -n "$$WEAVIATE_URL" || { echo "make test-weaviate: set WEAVIATE_URL to a disposable Weaviate"; exit 2; }
	$(PY) -m pytest -q -rs -p no:cacheprovider -m weaviate

lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(PY) bench/run.py
	$(PY) bench/restore.py
	$(PY) bench/pitr.py
	$(PY) bench/webhook.py
	$(PY) bench/integrity.py
	$(PY) bench/redis_snapshot.py
	$(PY) bench/tarstream.py

clean:
	rm -rf $(VENV) .demo .bench
