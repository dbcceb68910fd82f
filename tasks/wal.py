"""WAL file names, LSN and timeline arithmetic, the WAL archive's layout in the store, recovery settings,
and the PITR retention policy: pure functions, no I/O.

Standard library only: `runbooks wal-push` imports this from PostgreSQL's archive_command and must start
fast (no Prefect, no pydantic).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

from blocks.errors import ConfigurationError

WAL_PREFIX = "wal/"
CLUSTER_KEY = "wal/cluster.json"  # which cluster (system identifier) this archive belongs to
RESTORE_POINTS_PREFIX = "wal/restore-points/"
DEFAULT_SEGMENT_SIZE = 16 * 1024 * 1024
_XLOG_ID_SPAN = 0x1_0000_0000  # bytes of WAL per "log" number (the middle 8 hex digits of a segment name)

_SEGMENT = re.compile(r"^([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{8})$")
_HISTORY = re.compile(r"^([0-9A-F]{8})\.history$")
_BACKUP = re.compile(r"^([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{8})\.([0-9A-F]{8})\.backup$")
_PARTIAL = re.compile(r"^([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{8})\.partial$")
_LSN = re.compile(r"^([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})$")

WalKind = Literal["segment", "history", "backup", "partial"]


# ------------------------------------------------------------------------------------------------ LSN


def parse_lsn(text: str) -> int:
    """``'16/B374D848'`` -> byte position in the WAL stream."""
    match = _LSN.match(text.strip())
    if not match:
        raise ConfigurationError(f"{text!r} is not an LSN (like 0/3000028)")
    return (int(match.group(1), 16) << 32) | int(match.group(2), 16)


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def _segments_per_log(segment_size: int) -> int:
    if segment_size <= 0 or segment_size & (segment_size - 1) or _XLOG_ID_SPAN % segment_size:
        raise ConfigurationError(f"WAL segment size {segment_size} is not a power of two of at most 1 GiB")
    return _XLOG_ID_SPAN // segment_size


def segment_of_lsn(lsn: int, segment_size: int = DEFAULT_SEGMENT_SIZE) -> int:
    """Segment number holding the byte at ``lsn``."""
    _segments_per_log(segment_size)
    return lsn // segment_size


def segment_name(timeline: int, segno: int, segment_size: int = DEFAULT_SEGMENT_SIZE) -> str:
    """File name of segment ``segno`` on ``timeline`` (as in pg_wal)."""
    per_log = _segments_per_log(segment_size)
    return f"{timeline:08X}{segno // per_log:08X}{segno % per_log:08X}"


def history_name(timeline: int) -> str:
    return f"{timeline:08X}.history"


# -------------------------------------------------------------------------------------------- WAL files


@dataclass(frozen=True)
class WalFile:
    """One file PostgreSQL archives: a segment, a timeline history, a backup history or a partial segment."""

    name: str
    kind: WalKind
    timeline: int
    log: int = 0
    seg: int = 0

    def segno(self, segment_size: int = DEFAULT_SEGMENT_SIZE) -> int:
        """Segment number (history files have none: -1)."""
        if self.kind == "history":
            return -1
        return self.log * _segments_per_log(segment_size) + self.seg


def parse_wal_name(name: str) -> WalFile:
    """Classify a file name PostgreSQL hands to archive_command / restore_command (``%f``)."""
    if match := _SEGMENT.match(name):
        return WalFile(name, "segment", int(match.group(1), 16), int(match.group(2), 16), int(match.group(3), 16))
    if match := _HISTORY.match(name):
        return WalFile(name, "history", int(match.group(1), 16))
    if match := _BACKUP.match(name):
        return WalFile(name, "backup", int(match.group(1), 16), int(match.group(2), 16), int(match.group(3), 16))
    if match := _PARTIAL.match(name):
        return WalFile(name, "partial", int(match.group(1), 16), int(match.group(2), 16), int(match.group(3), 16))
    raise ConfigurationError(
        f"{name!r} is not a WAL file name (segment, NNNNNNNN.history, .backup or .partial): "
        "archive_command must pass %p and restore_command %f %p"
    )


def wal_key(name: str, raw_sha256: str | None = None) -> str:
    """Object key of an archived WAL file, laid out by timeline: ``wal/00000002/000000020000000000000007.zst``.

    A ``.partial`` segment (the last, unfinished segment of a timeline a promotion left behind) is keyed by
    its content: two restores that promote at different points each leave their own, and neither is ever
    needed by recovery, so both are kept instead of the second being refused.
    """
    wal = parse_wal_name(name)
    if wal.kind == "partial":
        if not raw_sha256:
            raise ConfigurationError(f"{name}: a .partial segment is keyed by its sha256; none given")
        return f"{WAL_PREFIX}{wal.timeline:08X}/{name}.{raw_sha256[:16]}.zst"
    return f"{WAL_PREFIX}{wal.timeline:08X}/{name}.zst"


def name_of_key(key: str) -> str | None:
    """The WAL file name an archive key holds, or None for anything else under ``wal/``."""
    if not key.startswith(WAL_PREFIX) or not key.endswith(".zst"):
        return None
    base = key.rsplit("/", 1)[-1][: -len(".zst")]
    if ".partial." in base:
        base = base.split(".partial.", 1)[0] + ".partial"
    try:
        parse_wal_name(base)
    except ConfigurationError:
        return None
    return base


def archive_priority(name: str) -> tuple[int, str]:
    """Sort key in the order PostgreSQL's archiver takes ``.ready`` files: timeline histories first."""
    return (0 if name.endswith(".history") else 1, name)


# -------------------------------------------------------------------------------------------- timelines


@dataclass(frozen=True)
class HistoryEntry:
    """One line of a ``NNNNNNNN.history`` file: ``parent`` ended at ``switch_lsn``."""

    parent: int
    switch_lsn: int
    reason: str


@dataclass(frozen=True)
class TimelineSpan:
    """The stretch of WAL a timeline contributes on the way to a target timeline (end None: open)."""

    timeline: int
    begin: int
    end: int | None


def parse_history(text: str) -> list[HistoryEntry]:
    """Parse a timeline history file (tab-separated ``parent  switch LSN  reason``; ``#`` comments)."""
    entries: list[HistoryEntry] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split(None, 2)
        if len(fields) < 2 or not fields[0].isdigit():
            raise ConfigurationError(f"bad timeline history line {line!r}")
        entries.append(HistoryEntry(int(fields[0]), parse_lsn(fields[1]), fields[2] if len(fields) > 2 else ""))
    for before, after in zip(entries, entries[1:], strict=False):
        if after.parent <= before.parent:
            raise ConfigurationError("timeline history is not in increasing timeline order")
    return entries


def timeline_path(target: int, history: list[HistoryEntry]) -> list[TimelineSpan]:
    """The timelines (oldest first) recovery follows to reach ``target``, given ``target``'s history file."""
    spans: list[TimelineSpan] = []
    begin = 0
    for entry in history:
        spans.append(TimelineSpan(entry.parent, begin, entry.switch_lsn))
        begin = entry.switch_lsn
    spans.append(TimelineSpan(target, begin, None))
    return spans


def on_path(spans: list[TimelineSpan], timeline: int, lsn: int) -> bool:
    """True when WAL position ``lsn`` of ``timeline`` lies on the path (PostgreSQL's "is a child of" check)."""
    return any(s.timeline == timeline and s.begin <= lsn and (s.end is None or lsn < s.end) for s in spans)


def newest_timeline(start: int, history_timelines: Iterable[int]) -> int:
    """What ``recovery_target_timeline = 'latest'`` picks: probe start+1, start+2 ... while a history exists."""
    known = set(history_timelines)
    newest = start
    while newest + 1 in known:
        newest += 1
    return newest


def _candidates(spans: list[TimelineSpan], segno: int, segment_size: int) -> list[int]:
    """Timelines PostgreSQL tries for segment ``segno``, newest first (see XLogFileReadAnyTLI)."""
    return [s.timeline for s in reversed(spans) if segment_of_lsn(s.begin, segment_size) <= segno
            and (s.end is None or segment_of_lsn(s.end, segment_size) >= segno)]


@dataclass(frozen=True)
class WalChain:
    """Segments a restore reads, from the base backup's start to ``last`` (or to the end of the archive)."""

    first: str
    last: str | None
    segments: int
    missing: str | None = None  # the first segment of the chain that is not in the archive
    after_gap: int = 0  # archived segments beyond the gap (0: the gap is just the end of the archive)


def plan_chain(
    spans: list[TimelineSpan],
    start_lsn: int,
    archived: set[str],
    *,
    stop_lsn: int | None = None,
    segment_size: int = DEFAULT_SEGMENT_SIZE,
) -> WalChain:
    """Walk the chain from ``start_lsn`` along ``spans`` and find the first segment missing from ``archived``.

    With ``stop_lsn`` (an LSN target, or a base backup's own end) the chain must reach that segment; without
    one it runs to the newest archived segment on the path, so a gap followed by more WAL is found too.
    """
    first_segno = segment_of_lsn(start_lsn, segment_size)
    if stop_lsn is not None:
        last_segno = segment_of_lsn(stop_lsn, segment_size)
    else:
        last_segno = first_segno
        for wal in (parse_wal_name(n) for n in archived if _SEGMENT.match(n)):
            segno = wal.segno(segment_size)
            if segno > last_segno and wal.timeline in _candidates(spans, segno, segment_size):
                last_segno = segno
    first_candidates = _candidates(spans, first_segno, segment_size) or [spans[0].timeline]
    first = segment_name(first_candidates[0], first_segno, segment_size)

    def present(segno: int) -> str | None:
        names = (segment_name(t, segno, segment_size) for t in _candidates(spans, segno, segment_size))
        return next((n for n in names if n in archived), None)

    for segno in range(first_segno, last_segno + 1):
        if present(segno) is None:
            candidates = _candidates(spans, segno, segment_size)
            missing = segment_name(candidates[0] if candidates else spans[-1].timeline, segno, segment_size)
            after = sum(1 for later in range(segno + 1, last_segno + 1) if present(later) is not None)
            return WalChain(first, None, segno - first_segno, missing, after)
    return WalChain(first, present(last_segno), last_segno - first_segno + 1)


# ------------------------------------------------------------------------------------ recovery targets


RecoveryKind = Literal["latest", "time", "lsn", "name", "immediate"]


@dataclass(frozen=True)
class RecoveryTarget:
    """Where a restore stops: the end of the archive, a time, an LSN, a named restore point, or consistency."""

    kind: RecoveryKind = "latest"
    time: datetime | None = None
    lsn: int | None = None
    name: str | None = None
    inclusive: bool = True

    def __post_init__(self) -> None:
        given = {"time": self.time, "lsn": self.lsn, "name": self.name}
        wanted = {"time", "lsn", "name"} & {self.kind}
        for key, value in given.items():
            if key in wanted and value is None:
                raise ConfigurationError(f"recovery target {self.kind!r} needs target_{key}")
            if key not in wanted and value is not None:
                raise ConfigurationError(f"target_{key} given, but the recovery target is {self.kind!r}")
        if self.time is not None and self.time.tzinfo is None:
            raise ConfigurationError("target_time needs a time zone (e.g. 2026-11-22T02:00:00+00:00)")
        if self.name is not None and (not self.name or len(self.name) > 63):
            raise ConfigurationError("a restore point name is 1 to 63 bytes")
        if self.name is not None and any(ord(c) < 32 or ord(c) == 127 for c in self.name):
            raise ConfigurationError("a restore point name cannot hold control characters (e.g. a newline)")

    def describe(self) -> str:
        match self.kind:
            case "time":
                assert self.time is not None
                return f"time {self.time.isoformat()}"
            case "lsn":
                assert self.lsn is not None
                return f"LSN {format_lsn(self.lsn)}"
            case "name":
                return f"restore point {self.name!r}"
        return self.kind


def recovery_settings(
    target: RecoveryTarget, *, restore_command: str, timeline: str = "latest", action: str = "promote"
) -> dict[str, str]:
    """The recovery parameters of postgresql.conf (PostgreSQL 12+) for ``target``."""
    if action not in ("promote", "pause", "shutdown"):
        raise ConfigurationError(f"recovery action {action!r}: use promote, pause or shutdown")
    if timeline not in ("latest", "current") and not timeline.isdigit():
        raise ConfigurationError(f"timeline {timeline!r}: use latest, current or a timeline number")
    settings = {"restore_command": restore_command, "recovery_target_timeline": timeline}
    if target.kind == "time":
        assert target.time is not None
        settings["recovery_target_time"] = target.time.isoformat(sep=" ")
    elif target.kind == "lsn":
        assert target.lsn is not None
        settings["recovery_target_lsn"] = format_lsn(target.lsn)
    elif target.kind == "name":
        assert target.name is not None
        settings["recovery_target_name"] = target.name
    elif target.kind == "immediate":
        settings["recovery_target"] = "immediate"
    if target.kind in ("time", "lsn"):
        settings["recovery_target_inclusive"] = "on" if target.inclusive else "off"
    if target.kind != "latest":
        settings["recovery_target_action"] = action
    return settings


# A word of restore_command: what shlex.quote leaves unquoted, so no word can carry shell syntax.
_COMMAND_WORD = re.compile(r"^[A-Za-z0-9_@%+=:,./-]+$")


def restore_command_argv(words: list[str] | str) -> list[str]:
    """Check a restore_command argv template: this project's ``wal-fetch`` and nothing else.

    ``<runbooks> wal-fetch [--config FILE] %f %p`` where ``<runbooks>`` is a ``runbooks`` executable or
    ``<python> -m deployments.cli``; the only placeholders are ``%f`` and ``%p`` (as the last two words),
    and every word is letters, digits and ``_@%+=:,./-``. A string is split with shlex first.
    """
    if isinstance(words, str):
        try:
            words = shlex.split(words)
        except ValueError as exc:
            raise ConfigurationError(f"restore_command cannot be parsed: {exc}") from None
    argv = list(words)
    shown = " ".join(argv)[:200]
    for word in argv:
        if not _COMMAND_WORD.match(word):
            raise ConfigurationError(
                f"restore_command word {word[:80]!r} has characters other than letters, digits and _@%+=:,./- "
                "(no shell syntax, spaces or quotes are allowed); nothing was changed")
    if "wal-fetch" not in argv or argv.count("wal-fetch") != 1:
        raise ConfigurationError(f"restore_command {shown!r} must run `runbooks wal-fetch` once; nothing was changed")
    at = argv.index("wal-fetch")
    program, options, placeholders = argv[:at], argv[at + 1:-2], argv[-2:]
    runbooks = len(program) == 1 and program[0].rsplit("/", 1)[-1] == "runbooks"
    module = (len(program) == 3 and program[0].rsplit("/", 1)[-1].startswith("python")
              and program[1:] == ["-m", "deployments.cli"])
    if not (runbooks or module):
        raise ConfigurationError(f"restore_command {shown!r}: the program must be `runbooks` or "
                                 "`<python> -m deployments.cli`; nothing was changed")
    config = options == [] or (len(options) == 2 and options[0] == "--config") or (
        len(options) == 1 and options[0].startswith("--config="))
    if placeholders != ["%f", "%p"] or not config or any("%" in w for w in argv[:-2]):
        raise ConfigurationError(f"restore_command {shown!r} must be `... wal-fetch [--config FILE] %f %p` "
                                 "(%f and %p are the only placeholders); nothing was changed")
    return argv


def restore_command_line(argv: list[str]) -> str:
    """The restore_command value PostgreSQL runs through /bin/sh: the checked argv, every word shell-quoted.
    (``%f``/``%p`` need no quoting, and PostgreSQL substitutes them with a WAL file name and pg_wal/ path.)"""
    return " ".join(shlex.quote(word) for word in restore_command_argv(argv))


def restore_command_for(archive_command: str) -> list[str]:
    """The restore_command argv matching an archive_command that runs ``wal-push``: same program and options.

    ``/opt/runbooks/bin/runbooks wal-push --config /etc/runbooks/wal.env %p``
    -> ``/opt/runbooks/bin/runbooks wal-fetch --config /etc/runbooks/wal.env %f %p``
    """
    try:
        words = shlex.split(archive_command)
    except ValueError as exc:
        raise ConfigurationError(f"cannot parse archive_command {archive_command[:200]!r}: {exc}") from None
    shell = set(";|&<>`$()\n")
    if "wal-push" not in words or words[-1:] != ["%p"] or words.count("%p") != 1 or shell & set(archive_command):
        raise ConfigurationError(
            f"archive_command {archive_command[:200]!r} is not `... runbooks wal-push [options] %p`; "
            "give restore_command explicitly"
        )
    at = words.index("wal-push")
    return restore_command_argv([*words[:at], "wal-fetch", *words[at + 1:-1], "%f", "%p"])


# ------------------------------------------------------------------------------------- recovery log


@dataclass
class RecoveryLog:
    """What a server log says about one archive recovery (messages in English: lc_messages = 'C')."""

    stopped_at: str | None = None  # "before commit of transaction 745, time ...", "at restore point ..."
    stop_time: str | None = None
    stop_lsn: str | None = None
    redo_done_lsn: str | None = None
    last_transaction_time: str | None = None
    new_timeline: int | None = None
    complete: bool = False  # archive recovery complete
    ready: bool = False  # accepting connections after recovery
    paused: bool = False
    shut_down: bool = False
    fatal: list[str] = field(default_factory=list)
    restore_failures: list[str] = field(default_factory=list)  # what wal-fetch said on stderr
    restored: list[str] = field(default_factory=list)  # files restored from the archive, in order


_STOPPING = re.compile(r"LOG:\s+recovery stopping (.*)$")
_STOP_TIME = re.compile(r"time (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?[+-]\d\d(?::?\d\d)?)")
_STOP_LSN = re.compile(r'WAL location \(LSN\) "([0-9A-F]+/[0-9A-F]+)"')
_REDO_DONE = re.compile(r"LOG:\s+redo done at ([0-9A-F]+/[0-9A-F]+)")
_LAST_TX = re.compile(r"LOG:\s+last completed transaction was at log time (.+)$")
_NEW_TLI = re.compile(r"LOG:\s+selected new timeline ID: (\d+)")
_FATAL = re.compile(r"(?:FATAL|PANIC):\s+(.*)$")
_RESTORED = re.compile(r'LOG:\s+restored log file "([0-9A-F]{24})" from archive')


def parse_recovery_log(text: str) -> RecoveryLog:
    log = RecoveryLog()
    for line in text.splitlines():
        if match := _STOPPING.search(line):
            log.stopped_at = match.group(1).strip()
            if time_match := _STOP_TIME.search(log.stopped_at):
                log.stop_time = time_match.group(1)
            if lsn_match := _STOP_LSN.search(log.stopped_at):
                log.stop_lsn = lsn_match.group(1)
        elif match := _RESTORED.search(line):
            log.restored.append(match.group(1))
        elif match := _REDO_DONE.search(line):
            log.redo_done_lsn = match.group(1)
        elif match := _LAST_TX.search(line):
            log.last_transaction_time = match.group(1).strip()
        elif match := _NEW_TLI.search(line):
            log.new_timeline = int(match.group(1))
        elif "LOG:  archive recovery complete" in line:
            log.complete = True
        elif "database system is ready to accept connections" in line and log.complete:
            log.ready = True
        elif "recovery has paused" in line or "pausing at the end of recovery" in line:
            log.paused = True
        elif "shutdown at recovery target" in line or "database system is shut down" in line:
            log.shut_down = True
        elif match := _FATAL.search(line):
            log.fatal.append(match.group(1).strip())
        elif "wal-fetch:" in line:
            log.restore_failures.append(line.split("wal-fetch:", 1)[1].strip())
    return log


# --------------------------------------------------------------------------------- backups and retention


@dataclass(frozen=True)
class BaseBackupRef:
    """What choosing and expiring base backups needs to know of one (from its manifest)."""

    set_id: str
    timeline: int
    start_lsn: int
    stop_lsn: int
    stop_time: datetime
    segment_size: int = DEFAULT_SEGMENT_SIZE

    @property
    def start_segno(self) -> int:
        return segment_of_lsn(self.start_lsn, self.segment_size)


def backups_before(backups: list[BaseBackupRef], target: RecoveryTarget, known_target: int | None = None) -> list[
        BaseBackupRef]:
    """Base backups a restore to ``target`` can start from, newest first.

    A backup qualifies when it became consistent before the target: its end (stop_time / stop_lsn) lies
    before a time / LSN target. ``known_target`` is the LSN of a named restore point when it is on record.
    """
    usable = []
    for backup in backups:
        if target.kind == "time":
            assert target.time is not None
            if backup.stop_time > target.time:
                continue
        elif target.kind == "lsn" or known_target is not None:
            limit = target.lsn if target.kind == "lsn" else known_target
            assert limit is not None
            if backup.stop_lsn > limit:
                continue
        usable.append(backup)
    return sorted(usable, key=lambda b: (b.stop_lsn, b.set_id), reverse=True)


@dataclass(frozen=True)
class RetentionPlan:
    """Which base backups stay, which go, and which archived WAL files nothing kept needs any more."""

    keep: list[str]
    expire: list[str]
    delete_wal: list[str]
    oldest_needed: str | None  # first segment (by number) the oldest kept backup needs
    reasons: dict[str, str] = field(default_factory=dict)


def plan_pitr_retention(
    backups: list[BaseBackupRef],
    archived: list[str],
    *,
    keep_last: int = 2,
    keep_within: timedelta | None = None,
    now: datetime,
) -> RetentionPlan:
    """Expire base backups by count and age, and the WAL only expired backups needed.

    - the ``keep_last`` newest backups stay (at least one always does);
    - with ``keep_within``, every backup that ended within that window stays, and so does the newest one that
      ended before it, so any moment of the window stays restorable;
    - WAL segments (and .backup / .partial files) numbered below the oldest kept backup's start segment go;
      timeline history files always stay (tiny, and recovery needs them to pick a timeline);
    - without any complete backup nothing is deleted: the WAL may belong to a base backup still running.
    """
    if keep_last < 1:
        raise ConfigurationError("keep_last must be at least 1: the newest base backup is never expired")
    ordered = sorted(backups, key=lambda b: (b.stop_time, b.set_id), reverse=True)
    if not ordered:
        return RetentionPlan(keep=[], expire=[], delete_wal=[], oldest_needed=None,
                             reasons={"*": "no complete base backup: nothing expired"})
    reasons: dict[str, str] = {}
    for backup in ordered[:keep_last]:
        reasons[backup.set_id] = f"one of the {keep_last} newest"
    if keep_within is not None:
        horizon = now - keep_within
        inside = [b for b in ordered if b.stop_time >= horizon]
        for backup in inside:
            reasons.setdefault(backup.set_id, f"ended within the last {keep_within}")
        before = [b for b in ordered if b.stop_time < horizon]
        if before:
            reasons.setdefault(before[0].set_id, "newest before the window: restores its start")
    keep = [b for b in ordered if b.set_id in reasons]
    expire = [b.set_id for b in ordered if b.set_id not in reasons]
    oldest = min(keep, key=lambda b: b.start_segno)
    delete_wal = []
    for name in archived:
        wal = parse_wal_name(name)
        if wal.kind != "history" and wal.segno(oldest.segment_size) < oldest.start_segno:
            delete_wal.append(name)
    return RetentionPlan(
        keep=sorted(b.set_id for b in keep), expire=sorted(expire), delete_wal=sorted(delete_wal),
        oldest_needed=segment_name(oldest.timeline, oldest.start_segno, oldest.segment_size), reasons=reasons,
    )


# ---------------------------------------------------------------------------------------- base backups


def parse_backup_label(text: str) -> dict[str, str]:
    """``backup_label`` as a dict (``START WAL LOCATION`` -> ``0/2000028 (file 0000...)`` ...)."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(": ")
        if sep:
            found[key.strip()] = value.strip()
    return found


def label_start(label: dict[str, str]) -> tuple[int, int, int]:
    """(start LSN, checkpoint LSN, timeline) from a parsed backup_label."""
    try:
        start = parse_lsn(label["START WAL LOCATION"].split()[0])
        checkpoint = parse_lsn(label["CHECKPOINT LOCATION"])
        timeline = int(label["START TIMELINE"])
    except (KeyError, ValueError, IndexError) as exc:
        raise ConfigurationError(f"backup_label lacks {exc}: not a PostgreSQL 11+ base backup") from None
    return start, checkpoint, timeline
