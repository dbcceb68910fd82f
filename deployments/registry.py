"""Every runbook as a deployment, in one place: what `runbooks serve`/`up` serve, what the bridge may start.

Each entry names the flow (the contract operators and alert routes use), the module it lives in, its
schedules, default parameters, tags, and whether it is destructive (alert-started runs of destructive
runbooks wait for approval unless a route says otherwise). ``prefect.yaml`` declares the same deployments
for `prefect deploy --all`; tests/test_triggers_deploy.py keeps the two in step.

Runbooks whose module does not exist yet are skipped with one log line, never an error: the registry
lists what the project plans, discovery serves what is there. Nothing here imports Prefect until
:func:`discover` loads the flow modules.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("runbooks.registry")

PROJECT_ROOT = Path(__file__).resolve().parent.parent
TIMEZONE_ENV = "RUNBOOKS_TIMEZONE"
DEFAULT_TIMEZONE = "UTC"


def block_ref(slug: str) -> dict[str, dict[str, str]]:
    """A parameter default that points at a saved Block (``<block-type-slug>/<name>``), resolved per run."""
    return {"$ref": {"block_document_slug": slug}}


def block_slug(value: Any) -> str | None:
    """The slug of a :func:`block_ref` value, else None."""
    if isinstance(value, Mapping) and isinstance(value.get("$ref"), Mapping):
        slug = value["$ref"].get("block_document_slug")
        return slug if isinstance(slug, str) else None
    return None


@dataclass(frozen=True)
class Runbook:
    """One deployment of one runbook flow."""

    flow: str
    deployment: str
    module: str  # path below the project root, e.g. "flows/backup.py"
    description: str
    schedules: tuple[str, ...] = ()  # cron expressions, in the configured timezone
    parameters: Mapping[str, Any] = field(default_factory=dict)
    schedule_parameters: Mapping[str, Any] = field(default_factory=dict)  # only for scheduled runs
    tags: tuple[str, ...] = ()
    destructive: bool = False
    # A run that pauses for approval inside the flow holds no deployment concurrency slot: Prefect 3.8
    # releases the slot when the run pauses while the running flow keeps renewing its 300 s lease, and a
    # failed renewal crashes the run. Those runbooks serialise on their per-target lock (tasks/locks.py),
    # taken after the approval.
    asks_approval: bool = False
    concurrency_limit: int | None = None

    @property
    def name(self) -> str:
        """``flow/deployment``, as Prefect and the routes file spell a deployment."""
        return f"{self.flow}/{self.deployment}"

    @property
    def module_path(self) -> Path:
        return PROJECT_ROOT / self.module

    @property
    def import_name(self) -> str:
        return self.module.removesuffix(".py").replace("/", ".")

    @property
    def all_tags(self) -> list[str]:
        return sorted({"runbooks", *self.tags, *(["destructive"] if self.destructive else [])})


_STORE = block_ref("backup-store/backups")
_POSTGRES = block_ref("postgres-connection/app-db")
_REDIS = block_ref("redis-connection/app-redis")

RUNBOOKS: tuple[Runbook, ...] = (
    Runbook(
        flow="backup", deployment="nightly", module="flows/backup.py",
        description="Logical backup of PostgreSQL (+ globals), Redis and directories into the store; manifest last.",
        schedules=("0 2 * * *",),
        parameters={"store": _STORE, "postgres": _POSTGRES, "redis": _REDIS, "include_globals": True,
                    "tags": ["nightly"]},
        tags=("backup",), concurrency_limit=1,
    ),
    Runbook(
        flow="restore-set", deployment="restore-set", module="flows/restore.py",
        description="Restore a backup set into NEW targets and verify it against its manifest; overwrites nothing.",
        parameters={"store": _STORE, "backup_id": "latest"},
        tags=("restore",),
    ),
    Runbook(
        flow="verify-backup", deployment="after-nightly", module="flows/verify.py",
        description="Restore drill of the newest set into scratch PostgreSQL/Redis, compared with its manifest.",
        schedules=("0 4 * * *",),  # two hours after the nightly backup
        parameters={"store": _STORE, "backup_id": "latest"},
        tags=("backup", "verify"), concurrency_limit=1,
    ),
    Runbook(
        flow="apply-retention", deployment="daily", module="flows/retention.py",
        description="GFS retention; never removes the newest verified backup or a PITR chain still needed.",
        schedules=("30 5 * * *",),  # after the verify drill, so the newest set is verified first
        parameters={"store": _STORE},
        schedule_parameters={"dry_run": False},  # a click in the UI plans (dry run); the schedule deletes
        tags=("backup", "retention"), destructive=True, concurrency_limit=1,
    ),
    Runbook(
        flow="disaster-recovery", deployment="disaster-recovery", module="flows/disaster_recovery.py",
        description="Restore a backup set over production, all or nothing: prepared beside, swapped in with undo.",
        parameters={"store": _STORE},
        tags=("restore",), destructive=True, asks_approval=True,
    ),
    Runbook(
        flow="pitr-base-backup", deployment="weekly", module="flows/pitr.py",
        description="Physical base backup with WAL archiving checks.",
        schedules=("0 1 * * 0",),  # Sundays 01:00
        parameters={"store": _STORE, "postgres": _POSTGRES},
        tags=("backup", "pitr"), concurrency_limit=1,
    ),
    Runbook(
        flow="pitr-restore", deployment="pitr-restore", module="flows/pitr.py",
        description="Restore a new cluster to a time, LSN or restore point.",
        parameters={"store": _STORE},
        tags=("restore", "pitr"), destructive=True, concurrency_limit=1,
    ),
    Runbook(
        flow="rollback", deployment="rollback", module="flows/rollback.py",
        description="Roll a Kubernetes deployment (or compose service over SSH) back to a previous revision.",
        parameters={"cluster": block_ref("kubernetes-cluster/app"), "app": block_ref("app-endpoint/app")},
        tags=("deploy",), destructive=True, asks_approval=True,
    ),
    Runbook(
        flow="maintenance-window", deployment="maintenance-window", module="flows/maintenance.py",
        description="Silence alerts, maintenance mode, drain, backup, update, migrate, restore service.",
        # the run's form asks for reason, deployments, images, migration and silence matchers
        parameters={"cluster": block_ref("kubernetes-cluster/app"), "app": block_ref("app-endpoint/app"),
                    "alertmanager": block_ref("alertmanager-api/alertmanager"), "postgres": _POSTGRES,
                    "store": _STORE},
        tags=("deploy",), destructive=True, concurrency_limit=1,
    ),
    Runbook(
        flow="db-integrity-check", deployment="weekly", module="flows/integrity.py",
        description="amcheck, checksum failures, invalid indexes, wraparound, sequences, long transactions.",
        schedules=("0 3 * * 6",),  # Saturdays 03:00
        # The store names the newest verified backup when table data is damaged; amcheck is created where missing.
        parameters={"postgres": _POSTGRES, "store": _STORE, "install_amcheck": True},
        tags=("postgres", "integrity"),
    ),
)


def by_name(runbooks: Iterable[Runbook] = RUNBOOKS) -> dict[str, Runbook]:
    """``flow/deployment`` -> entry."""
    return {r.name: r for r in runbooks}


def schedule_timezone(env: Mapping[str, str] | None = None) -> str:
    """The timezone cron schedules are read in: $RUNBOOKS_TIMEZONE (IANA name), default UTC."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    tz = (env if env is not None else os.environ).get(TIMEZONE_ENV) or DEFAULT_TIMEZONE
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        from blocks.errors import ConfigurationError

        raise ConfigurationError(f"${TIMEZONE_ENV}={tz!r} is not an IANA timezone (e.g. Europe/Berlin)") from exc
    return tz


@dataclass(frozen=True)
class Discovered:
    """A registry entry whose flow was found, with the loaded Flow object and its attribute name."""

    runbook: Runbook
    flow: Any  # prefect.Flow
    attribute: str

    @property
    def entrypoint(self) -> str:
        return f"{self.runbook.module}:{self.attribute}"


@dataclass(frozen=True)
class Skipped:
    runbook: Runbook
    reason: str


def find_flow(module: Any, flow_name: str) -> tuple[str, Any] | None:
    """The (attribute, Flow) defined in ``module`` whose Prefect flow name is ``flow_name``."""
    from prefect import Flow

    for attribute, value in vars(module).items():
        if (isinstance(value, Flow) and value.name == flow_name
                and getattr(value.fn, "__module__", None) == module.__name__):
            return attribute, value
    return None


def discover(
    runbooks: Iterable[Runbook] = RUNBOOKS, *, only: Iterable[str] | None = None
) -> tuple[list[Discovered], list[Skipped]]:
    """Load each entry's module and find its flow; entries that are not there yet are skipped, with why."""
    wanted = set(only or [])
    found: list[Discovered] = []
    skipped: list[Skipped] = []
    for runbook in runbooks:
        if wanted and runbook.name not in wanted and runbook.flow not in wanted:
            continue
        if not runbook.module_path.is_file():
            skipped.append(Skipped(runbook, f"{runbook.module} does not exist yet"))
            continue
        try:
            module = importlib.import_module(runbook.import_name)
        except Exception as exc:  # noqa: BLE001 - one broken module must not stop the other runbooks
            skipped.append(Skipped(runbook, f"{runbook.module} failed to import: {type(exc).__name__}: {exc}"))
            continue
        hit = find_flow(module, runbook.flow)
        if hit is None:
            skipped.append(Skipped(runbook, f"{runbook.module} has no flow named {runbook.flow!r} yet"))
            continue
        found.append(Discovered(runbook, hit[1], hit[0]))
    for miss in skipped:
        log.warning("runbook %s not served: %s", miss.runbook.name, miss.reason)
    return found, skipped
