# The README's quick start: `make demo` and `make test`. Both install whatever is missing.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install system-deps demo test lint bench clean

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
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

$(STAMP): pyproject.toml requirements.lock tasks/_dumpscan.c
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	@touch $(STAMP)

demo: install
	$(VENV)/bin/runbooks demo

test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -rs -x -p no:cacheprovider

lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(PY) bench/run.py
	$(PY) bench/restore.py
	$(PY) bench/pitr.py
	$(PY) bench/webhook.py
	$(PY) bench/integrity.py

clean:
	rm -rf $(VENV) .demo .bench
