"""`runbooks demo`: the main job on embedded defaults, end to end, verified.

Starts a sandbox PostgreSQL and Redis (unless RUNBOOKS_DEMO_POSTGRES_URL / RUNBOOKS_DEMO_REDIS_URL name
real ones), seeds a small shop-like dataset, runs the `backup` flow into a local store, restores the set
into fresh scratch instances with `restore-set`, and compares source and restore table by table and key
by key. Exit status 0 only if everything is identical.
"""

from __future__ import annotations

import os
import random
import secrets
import shutil
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import psycopg

from tasks.manifest import TableChecksum, human_size

DEMO_DB = "shop"
_SEED = 20261122


def _say(text: str) -> None:
    print(f"demo: {text}", flush=True)


def seed_postgres(url: str) -> None:
    """A shop: customers, orders (jsonb), product images (bytea), an audit schema, a sequence, a role."""
    with psycopg.connect(url, autocommit=True) as admin:
        if not admin.execute("SELECT 1 FROM pg_roles WHERE rolname = 'shop_app'").fetchone():
            admin.execute("CREATE ROLE shop_app LOGIN PASSWORD 'demo-only-password'")
        if admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DEMO_DB,)).fetchone():
            admin.execute(f'DROP DATABASE "{DEMO_DB}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{DEMO_DB}" OWNER shop_app')
    db_url = url.rsplit("/", 1)[0] + f"/{DEMO_DB}"
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("SELECT setseed(0.42)")
        conn.execute("""
            CREATE SCHEMA app AUTHORIZATION shop_app;
            CREATE SCHEMA audit AUTHORIZATION shop_app;
            CREATE TABLE app.customers (
                id bigserial PRIMARY KEY, email text UNIQUE NOT NULL, name text NOT NULL,
                created_at timestamptz NOT NULL, balance numeric(12,2) NOT NULL DEFAULT 0);
            CREATE TABLE app.orders (
                id bigserial PRIMARY KEY, customer_id bigint NOT NULL REFERENCES app.customers,
                placed_at timestamptz NOT NULL, total numeric(12,2) NOT NULL, items jsonb NOT NULL);
            CREATE INDEX ON app.orders (customer_id, placed_at);
            CREATE TABLE app.product_images (sku text PRIMARY KEY, content_type text, image bytea);
            CREATE TABLE audit.events (at timestamptz, actor text, action text, detail jsonb);
            CREATE SEQUENCE app.invoice_number START 100000;
        """)
        conn.execute("""
            INSERT INTO app.customers (email, name, created_at, balance)
            SELECT 'customer' || g || '@example.com', 'Customer ' || g,
                   timestamptz '2025-01-01' + g * interval '17 minutes', round((g % 997) * 1.37, 2)
            FROM generate_series(1, 5000) g""")
        conn.execute("""
            INSERT INTO app.orders (customer_id, placed_at, total, items)
            SELECT 1 + (g * 7919) % 5000, timestamptz '2025-06-01' + g * interval '3 minutes',
                   round(((g * 31) % 50000) / 100.0, 2),
                   jsonb_build_array(jsonb_build_object('sku', 'SKU-' || (g % 300), 'qty', 1 + g % 4,
                                                        'note', md5(g::text)))
            FROM generate_series(1, 30000) g""")
        conn.execute("""
            INSERT INTO app.product_images
            SELECT 'SKU-' || g, 'image/png', decode(repeat(md5(g::text), 64), 'hex')
            FROM generate_series(0, 299) g""")
        conn.execute("""
            INSERT INTO audit.events
            SELECT timestamptz '2025-06-01' + g * interval '1 minute', 'user' || (g % 50),
                   (ARRAY['login','checkout','refund','logout'])[1 + g % 4], jsonb_build_object('n', g)
            FROM generate_series(1, 10000) g""")
        conn.execute("SELECT setval('app.invoice_number', 104242)")


def seed_redis(client: object) -> int:
    """Sessions (hashes with TTLs), a cache, a leaderboard, a job queue, tags, an event stream."""
    rnd = random.Random(_SEED)
    pipe = client.pipeline(transaction=False)  # type: ignore[attr-defined]
    for i in range(500):
        pipe.hset(f"session:{i:05d}", mapping={"user": f"customer{i}", "cart": str(rnd.randint(0, 9))})
        pipe.expire(f"session:{i:05d}", 86400)
    for i in range(1000):
        pipe.set(f"cache:product:{i}", f'{{"sku":"SKU-{i % 300}","price":{rnd.randint(100, 99999)}}}')
    pipe.zadd("leaderboard", {f"customer{i}": rnd.randint(0, 10000) for i in range(200)})
    pipe.rpush("queue:emails", *[f"job-{i}" for i in range(100)])
    pipe.sadd("tags", *[f"tag{i}" for i in range(50)])
    for i in range(50):
        pipe.xadd("events", {"type": "checkout", "n": str(i)}, id=f"{1700000000000 + i}-0")
    pipe.set(b"binary:\x00\xff", bytes(range(256)))
    pipe.execute()
    return int(client.dbsize())  # type: ignore[attr-defined]


def seed_files(root: Path) -> None:
    rnd = random.Random(_SEED)
    (root / "uploads" / "2025").mkdir(parents=True, exist_ok=True)
    (root / "config").mkdir(exist_ok=True)
    for i in range(12):
        (root / "uploads" / "2025" / f"photo-{i:02d}.jpg").write_bytes(rnd.randbytes(20_000 + i * 1000))
    (root / "config" / "app.env").write_text("FEATURE_FLAGS=checkout,refunds\nLOG_LEVEL=info\n")
    os.symlink("config/app.env", root / "current.env")


def _compare_tables(source: list[TableChecksum], restored: list[TableChecksum]) -> tuple[int, list[str]]:
    have = {t.qualified: t for t in restored}
    print(f"  {'table / sequence':<32} {'rows (source)':>14} {'rows (restored)':>16}  content")
    identical, problems = 0, []
    for t in source:
        r = have.get(t.qualified)
        same = r is not None and r.rows == t.rows and r.checksum == t.checksum
        left, right = _shown(t), _shown(r)
        print(f"  {t.qualified:<32} {left:>14} {right:>16}  {'identical' if same else 'DIFFERS'}")
        if same:
            identical += 1
        else:
            problems.append(t.qualified)
    return identical, problems


def _shown(t: TableChecksum | None) -> str:
    """Rows of a table; ``value N`` of a sequence."""
    if t is None:
        return "-"
    if (t.checksum or "").startswith("seq:"):
        return f"value {t.checksum.split(':')[1]}"  # type: ignore[union-attr]
    return str(t.rows)


def run_demo() -> int:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from blocks.postgres import PostgresConnection
    from blocks.redis import RedisConnection
    from blocks.store import BackupStore
    from flows.backup import backup
    from flows.restore import restore_set
    from tasks.files import tree_digest
    from tasks.pg_checksums import collect_checksums
    from tasks.redis import keyspace_digest
    from tasks.scratch import ScratchPostgres
    from tasks.scratch_redis import ScratchRedis

    started = time.monotonic()
    work = Path(os.environ.get("RUNBOOKS_DEMO_DIR", ".demo")).resolve()
    store_dir, media_dir, restored_files = work / "store", work / "media", work / "restored-files"
    for path in (store_dir, media_dir, restored_files):
        shutil.rmtree(path, ignore_errors=True)
    media_dir.mkdir(parents=True)

    with ExitStack() as stack:
        pg_url = os.environ.get("RUNBOOKS_DEMO_POSTGRES_URL")
        redis_url = os.environ.get("RUNBOOKS_DEMO_REDIS_URL")
        if not pg_url:
            source_pg = stack.enter_context(ScratchPostgres(password=secrets.token_urlsafe(12), fast=True))
            pg_url = source_pg.url
        if not redis_url:
            source_redis = stack.enter_context(ScratchRedis(password=secrets.token_urlsafe(12)))
            redis_url = source_redis.url
        pg = PostgresConnection.from_url(pg_url)
        rconn = RedisConnection.from_url(redis_url)
        _say(f"source PostgreSQL {pg.describe()}, Redis {rconn.describe()}")

        seed_postgres(pg_url)
        keys = seed_redis(rconn.get_client())
        seed_files(media_dir)
        _say(f"seeded database {DEMO_DB!r}, {keys} Redis keys, files in {media_dir}")

        store = BackupStore.from_url(f"file://{store_dir}")
        result = backup(store=store, postgres=pg, databases=[DEMO_DB], redis=rconn,
                        paths=[str(media_dir)], tags=["demo"])
        _say(f"backup set {result.set_id}: {result.parts} parts, {human_size(result.raw_size)} -> "
             f"{human_size(result.size)} in {store.describe()} ({result.seconds:.1f} s)")

        target_pg = stack.enter_context(ScratchPostgres(password=secrets.token_urlsafe(12), fast=True))
        target_redis = stack.enter_context(ScratchRedis(password=secrets.token_urlsafe(12)))
        target = PostgresConnection.from_url(target_pg.url)
        target_r = RedisConnection.from_url(target_redis.url)
        _say(f"restoring into fresh PostgreSQL {target.describe()} and Redis {target_r.describe()}")
        restore_set(store=store, backup_id=result.set_id, postgres=target, databases=[DEMO_DB], redis=target_r,
                    files_root=str(restored_files))

        with pg.connect(DEMO_DB) as conn:
            before = collect_checksums(conn)
        with target.connect(DEMO_DB) as conn:
            after = collect_checksums(conn)
        print()
        identical, problems = _compare_tables(before, after)
        src_digest = keyspace_digest(rconn)
        dst_digest = keyspace_digest(target_r)
        same_redis = (src_digest.key_count, src_digest.digest) == (dst_digest.key_count, dst_digest.digest)
        print(f"  {'redis keyspace':<32} {src_digest.key_count:>14} {dst_digest.key_count:>16}  "
              f"{'identical' if same_redis else 'DIFFERS'}")
        files_src = tree_digest(media_dir)
        restored_root = next(p for p in restored_files.iterdir() if p.is_dir())
        files_dst = tree_digest(restored_root)
        same_files = files_src == files_dst
        print(f"  {'files ' + media_dir.name:<32} {files_src.files:>14} {files_dst.files:>16}  "
              f"{'identical' if same_files else 'DIFFERS'}")
        with target.connect(DEMO_DB, user="shop_app", password="demo-only-password") as conn:
            role_ok = conn.execute("SELECT current_user").fetchone()[0] == "shop_app"  # type: ignore[index]
        print(f"  {'role shop_app (password login)':<32} {'':>14} {'':>16}  {'identical' if role_ok else 'DIFFERS'}")
        print()

    tables = sum(1 for t in before if not (t.checksum or "").startswith("seq:"))
    _say(f"finished in {time.monotonic() - started:.0f} s")
    if problems or not same_redis or not same_files or not role_ok:
        print(f"NOT verified: differences in {problems or ''} {'' if same_redis else 'redis'} "
              f"{'' if same_files else 'files'} {'' if role_ok else 'roles'}".strip())
        return 1
    print(f"verified: {tables} tables, {dst_digest.key_count} keys identical")
    return 0


if __name__ == "__main__":
    sys.exit(run_demo())
