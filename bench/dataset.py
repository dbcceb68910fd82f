"""The bench database, generated deterministically: ``pgbench -i -s N`` plus one wide table.

Nothing here draws a random number. pgbench's client-side initialisation is sequential by design, and the
extra table derives every value from the row number (md5 of it for the text and the "random" bytes), so
two runs on any machine produce the same rows and the same dump size.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from psycopg import sql

from blocks.postgres import PostgresConnection
from tasks.process import pg_tool, run


@dataclass(frozen=True)
class DatasetSpec:
    """Size of one bench database: pgbench scale and rows of the wide table."""

    database: str
    scale: int
    rows: int

    def half(self, database: str) -> DatasetSpec:
        return DatasetSpec(database=database, scale=max(1, self.scale // 2), rows=self.rows // 2)

    def describe(self) -> str:
        return f"`pgbench -i -s {self.scale}` + {self.rows:,} rows of `bench_items`"


@dataclass(frozen=True)
class Dataset:
    spec: DatasetSpec
    bytes_on_disk: int
    seconds: float


# md5 text, a small jsonb document, 32 pseudo-random bytes (two md5 digests), and an index on the text.
ITEMS_DDL = "CREATE TABLE bench_items (label text NOT NULL, doc jsonb NOT NULL, payload bytea NOT NULL)"
ITEMS_FILL = """
INSERT INTO bench_items
SELECT md5(i::text),
       jsonb_build_object('n', i, 'user', 'u' || (i %% 10007), 'tag', 't' || (i %% 13)),
       decode(md5('a' || i) || md5('b' || i), 'hex')
FROM generate_series(1, %(rows)s) AS i
"""
ITEMS_INDEX = "CREATE INDEX bench_items_label ON bench_items (label)"


def generate(pg: PostgresConnection, spec: DatasetSpec, say: Callable[[str], None]) -> Dataset:
    """(Re)create ``spec.database`` and fill it; frozen and analysed so the dumps never write hint bits."""
    started = time.monotonic()
    with pg.connect(autocommit=True) as admin:
        name = sql.Identifier(spec.database)
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(name))
        admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(name))
    # pgbench has no --no-password; the password comes from PGPASSWORD in the environment.
    argv = [pg_tool("pgbench"), "--initialize", "--init-steps=dtgvp", f"--scale={spec.scale}", "--quiet"]
    code, _out, err = run(argv, env=pg.libpq_env(spec.database))
    if code != 0:
        raise RuntimeError(f"pgbench -i on {pg.describe(spec.database)} failed: {err.strip()[-500:]}")
    say(f"  pgbench -i -s {spec.scale} done in {time.monotonic() - started:.0f} s")
    with pg.connect(spec.database, autocommit=True) as conn:
        conn.execute(ITEMS_DDL)
        conn.execute(ITEMS_FILL, {"rows": spec.rows})
        conn.execute(ITEMS_INDEX)
        conn.execute("VACUUM (FREEZE, ANALYZE)")
        size = int(conn.execute("SELECT pg_database_size(current_database())").fetchone()[0])  # type: ignore[index]
    return Dataset(spec=spec, bytes_on_disk=size, seconds=time.monotonic() - started)
