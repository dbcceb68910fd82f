"""Results of a bench run and their markdown: pure functions, no I/O."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from bench.measure import median
from tasks.manifest import human_size

MiB = 1024 * 1024
RSS_LIMIT_MIB = 200
RSS_GROWTH_TOLERANCE_MIB = 8  # allocator noise; a streaming path grows by whole buffers, not by KiBs


@dataclass
class Sample:
    """One run of one variant."""

    seconds: float
    size: int | None = None
    peak_rss_kib: int | None = None
    cpu: dict[str, float] = field(default_factory=dict)
    startup_seconds: float | None = None
    rss_before_flow_kib: int | None = None
    task_seconds: float | None = None  # of a flow run: the dump_database task alone
    disturbed: bool = False  # other work on the machine took a noticeable share of the CPU meanwhile


@dataclass
class Variant:
    key: str
    title: str
    limit: float | None = None  # target wall time as a multiple of (a)
    samples: list[Sample] = field(default_factory=list)
    error: str | None = None

    @property
    def timed(self) -> list[Sample]:
        """The undisturbed samples, or all of them if every one was disturbed."""
        clean = [s for s in self.samples if not s.disturbed]
        return clean or self.samples

    @property
    def seconds(self) -> float:
        return median([s.seconds for s in self.timed])

    @property
    def size(self) -> int | None:
        sizes = [s.size for s in self.samples if s.size is not None]
        return int(median(sizes)) if sizes else None

    @property
    def peak_rss_mib(self) -> float | None:
        peaks = [s.peak_rss_kib for s in self.samples if s.peak_rss_kib is not None]
        return max(peaks) / 1024 if peaks else None

    def cpu(self, party: str) -> float:
        return median([s.cpu.get(party, 0.0) for s in self.timed])


CPU_PARTIES = (("ours", "ours"), ("tools", "pg_dump/gzip"), ("postgres", "PostgreSQL"),
               ("prefect_api", "Prefect API"), ("seaweedfs", "SeaweedFS"), ("other", "other"))


@dataclass
class Verdict:
    target: str
    measured: str
    ok: bool


def _fmt_seconds(values: list[float]) -> str:
    if not values:
        return "-"
    mid = median(values)
    if len(values) == 1:
        return f"{mid:.2f} s"
    return f"{mid:.2f} s ({min(values):.2f}-{max(values):.2f})"


def paired_ratios(variant: Variant, base: Variant) -> list[float]:
    """Each round's wall time over the same round's (a): pairs runs made minutes apart, so a machine that
    speeds up or slows down over the run moves both sides. Rounds where either run was disturbed are left
    out; empty when the variant did not run once per round."""
    if len(variant.samples) != len(base.samples):
        return []
    return [v.seconds / b.seconds for v, b in zip(variant.samples, base.samples, strict=True)
            if not (v.disturbed or b.disturbed)]


def ratio_to_base(variant: Variant, base: Variant) -> float:
    """The median of the per-round ratios; the ratio of the medians where rounds cannot be paired."""
    pairs = paired_ratios(variant, base)
    return median(pairs) if pairs else variant.seconds / base.seconds


def cpu_of_bench(variant: Variant) -> float:
    """CPU seconds of everything the bench ran for this variant (all parties but "other")."""
    return sum(variant.cpu(key) for key, _label in CPU_PARTIES if key != "other")


def verdicts(variants: dict[str, Variant], cores: int) -> list[Verdict]:
    """The issue's targets, each with what was measured and whether it holds."""
    found: list[Verdict] = []
    base = variants.get("a")
    if base is None or not base.samples:
        return found
    limit = base.seconds
    for variant in variants.values():
        if variant.limit is None:
            continue
        if variant.error or not variant.samples:
            found.append(Verdict(f"{variant.title} <= {variant.limit:.2f} x (a)", "failed to run", False))
            continue
        ratio = ratio_to_base(variant, base)
        over = (ratio / variant.limit - 1) * 100
        note = "" if ratio <= variant.limit else f", {over:.0f} % over the target"
        floor = cpu_of_bench(variant) / cores / limit
        if floor > variant.limit:
            note += f"; its CPU alone, spread over {cores} idle cores, takes {floor:.2f} x (a)"
        found.append(Verdict(f"{variant.title}: wall <= {variant.limit:.2f} x (a)", f"{ratio:.2f} x{note}",
                             ratio <= variant.limit))
    guide = variants.get("b")
    if guide is not None and guide.size:
        for variant in variants.values():
            if variant.limit is None or not variant.size:
                continue
            found.append(Verdict(
                f"{variant.title}: compressed size <= (b)'s",
                f"{human_size(variant.size)} vs {human_size(guide.size)} "
                f"({100 * variant.size / guide.size:.0f} %)",
                variant.size <= guide.size,
            ))
    peaks = [(v.title, v.peak_rss_mib) for v in variants.values() if v.peak_rss_mib is not None]
    if peaks:
        title, worst = max(peaks, key=lambda item: item[1])
        found.append(Verdict(f"peak RSS of our process <= {RSS_LIMIT_MIB} MiB", f"{worst:.0f} MiB at most ({title})",
                             worst <= RSS_LIMIT_MIB))
    half, full = variants.get("c-half"), variants.get("c")
    if half and full and half.peak_rss_mib is not None and full.peak_rss_mib is not None:
        growth = full.peak_rss_mib - half.peak_rss_mib
        found.append(Verdict(
            "peak RSS does not grow when the dataset doubles",
            f"{half.peak_rss_mib:.0f} MiB (half) -> {full.peak_rss_mib:.0f} MiB (full), {growth:+.0f} MiB",
            growth <= RSS_GROWTH_TOLERANCE_MIB,
        ))
    return found


def results_table(variants: dict[str, Variant]) -> list[str]:
    base = variants.get("a")
    lines = [
        "| variant | wall time, median (min-max) | runs | ratio to (a): median of rounds | each round's ratio | "
        "target | compressed size | peak RSS (ours) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v in variants.values():
        if v.error:
            lines.append(f"| {v.title} | failed: {v.error} | | | | | | |")
            continue
        usable = bool(v.samples and base and base.samples)
        ratio = ratio_to_base(v, base) if usable else math.nan  # type: ignore[arg-type]
        rounds = ", ".join(f"{r:.2f}" for r in paired_ratios(v, base)) if usable else ""  # type: ignore[arg-type]
        target = f"<= {v.limit:.2f}" if v.limit else ""
        if v.limit:
            target += " ok" if ratio <= v.limit else " **missed**"
        size = human_size(v.size) if v.size else "-"
        rss = f"{v.peak_rss_mib:.0f} MiB" if v.peak_rss_mib is not None else "- (no Python)"
        clean = sum(1 for s in v.samples if not s.disturbed)
        runs = f"{len(v.samples)}" if clean == len(v.samples) else f"{clean} of {len(v.samples)} undisturbed"
        lines.append(f"| {v.title} | {_fmt_seconds([s.seconds for s in v.timed])} | {runs} | {ratio:.2f} | "
                     f"{rounds or '-'} | {target} | {size} | {rss} |")
    return lines


def cpu_table(variants: dict[str, Variant], cores: int) -> list[str]:
    head = " | ".join(label for _key, label in CPU_PARTIES)
    lines = [
        f"| variant | wall | {head} | ours + tools + servers | that, as a ratio to (a) | floor on {cores} idle "
        "cores |",
        "|---|---|" + "---|" * len(CPU_PARTIES) + "---|---|---|",
    ]
    base = variants.get("a")
    base_cpu = cpu_of_bench(base) if base and base.samples else 0.0
    for v in variants.values():
        if v.error or not v.samples:
            continue
        cells = " | ".join(f"{v.cpu(key):.1f}" for key, _label in CPU_PARTIES)
        mine = cpu_of_bench(v)
        ratio = f"{mine / base_cpu:.2f}" if base_cpu else "-"
        lines.append(f"| {v.title} | {v.seconds:.2f} | {cells} | {mine:.1f} | {ratio} | {mine / cores:.1f} s |")
    return lines


def overhead_table(variants: dict[str, Variant]) -> list[str]:
    lines = [
        "| variant | flow call | `dump_database` task | the rest: flow and task runs, API calls, globals, manifest, "
        "artifacts |",
        "|---|---|---|---|",
    ]
    for v in variants.values():
        tasks = [s.task_seconds for s in v.timed if s.task_seconds is not None]
        if v.error or not tasks:
            continue
        rest = median([s.seconds - s.task_seconds for s in v.timed if s.task_seconds is not None])
        lines.append(f"| {v.title} | {v.seconds:.2f} s | {median(tasks):.2f} s | {rest:.2f} s |")
    return lines


# The other benchmarks of `make bench`, each writing its own page.
OTHER_PAGES = [
    "Other runbooks' benchmarks, each on its own page with its command:",
    "[disaster-recovery vs `pg_restore -j2`](benchmarks-restore.md) (`bench/restore.py`),",
    "[the Redis part of a backup vs `redis-cli --rdb`](benchmarks-redis.md) (`bench/redis_snapshot.py`),",
    "[PITR: WAL archiving and base backups](benchmarks-pitr.md) (`bench/pitr.py`),",
    "[alerts in: the bridge](benchmarks-triggers.md) (`bench/webhook.py`),",
    "[db-integrity-check vs `pg_amcheck`](benchmarks-integrity.md) (`bench/integrity.py`),",
    "[base-backup tar: TarStream vs `tarfile`](benchmarks-tarstream.md) (`bench/tarstream.py`).",
]


def splice_section(page: str, name: str, section: list[str]) -> str:
    """``page`` with the lines between ``<!-- name -->`` and ``<!-- /name -->`` replaced by ``section``
    (appended at the end if the markers are not there): how another benchmark's summary lives in
    docs/benchmarks.md beside what bench/run.py writes."""
    begin, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    block = "\n".join([begin, *section, end])
    if begin in page and end in page[page.index(begin):]:
        head, rest = page.split(begin, 1)
        return head + block + rest.split(end, 1)[1]
    return page.rstrip("\n") + "\n\n" + block + "\n"


def kept_sections(old_page: str, new_page: str, names: list[str]) -> str:
    """``new_page`` with the named sections of ``old_page`` carried over (bench/run.py rewrites the page)."""
    for name in names:
        begin, end = f"<!-- {name} -->", f"<!-- /{name} -->"
        if begin in old_page and end in old_page:
            inner = old_page.split(begin, 1)[1].split(end, 1)[0].strip("\n")
            new_page = splice_section(new_page, name, inner.split("\n"))
    return new_page


# Sections of docs/benchmarks.md written by other benchmarks (bench/restore.py).
OTHER_SECTIONS = ["restore"]


def render(meta: dict[str, str], variants: dict[str, Variant], cores: int, method: list[str]) -> str:
    """The whole docs/benchmarks.md."""
    lines = [
        "# Benchmarks",
        "",
        "Written by `make bench` (`bench/run.py`); rerun it to refresh this page. Numbers from one machine,",
        "one run: read them as ratios, not as absolute speeds.",
        "",
        *OTHER_PAGES,
        "",
        "## Backup: PostgreSQL dump to the local store and to S3",
        "",
    ]
    lines += [f"- {name}: {value}" for name, value in meta.items()]
    lines += ["", *results_table(variants), "", "### Targets", "", "| target | measured | |", "|---|---|---|"]
    lines += [f"| {v.target} | {v.measured} | {'ok' if v.ok else '**missed**'} |" for v in verdicts(variants, cores)]
    lines += [
        "",
        "### Where the flow's time went (medians)",
        "",
        *overhead_table(variants),
        "",
        "### Where the CPU went (seconds, medians)",
        "",
        "CPU seconds of each party during the measured interval: our Python process (zstd, sha256 and the",
        "table-checksum scanner run in its threads), the dump tools it started, PostgreSQL (the backends",
        "serving `COPY`), the Prefect API server, SeaweedFS, and whatever else ran on the machine (\"other\").",
        "These hold steadier than wall times on a shared machine. The floor is the bench's own CPU spread",
        "over every core: no run can be shorter, however well it overlaps.",
        "",
        *cpu_table(variants, cores),
        "",
        "### Method",
        "",
        *[f"- {line}" for line in method],
        "",
    ]
    startup = [s.startup_seconds for v in variants.values() for s in v.samples if s.startup_seconds is not None]
    before = [s.rss_before_flow_kib for v in variants.values() for s in v.samples if s.rss_before_flow_kib]
    if startup:
        lines.insert(len(lines) - 1, f"- Not in the wall times above: interpreter start and imports of a flow "
                                     f"process, median {median(startup):.2f} s; RSS after imports, before the "
                                     f"flow, median {median([b / 1024 for b in before]):.0f} MiB.")
    return "\n".join(lines)
