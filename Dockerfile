# The runbooks image: the Prefect worker, the Alertmanager bridge and the flow-run Jobs (deployments/k8s/).
# Its steps are scripts/install.sh, which CI also runs into a fresh virtualenv (tests/test_packaging.py).
#   docker build -t <registry>/runbooks:0.1.0 .
FROM debian:12-slim

ARG PG_MAJOR=15
ENV PG_MAJOR=${PG_MAJOR} \
    PATH=/opt/runbooks/bin:$PATH \
    RUNBOOKS_HOME=/app \
    RUNBOOKS_PG_BINDIR=/usr/lib/postgresql/${PG_MAJOR}/bin \
    PREFECT_HOME=/tmp/prefect \
    PYTHONUNBUFFERED=1

WORKDIR /app
COPY . /app
RUN scripts/install.sh --system-deps --extras kubernetes /opt/runbooks \
    && useradd --uid 10001 --no-create-home --home-dir /tmp runbooks

# The manifests run it as this user, with a read-only root filesystem and /tmp as an emptyDir.
USER 10001
CMD ["runbooks", "--help"]
