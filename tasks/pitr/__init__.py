"""Point-in-time recovery steps, one module a stage.

``preflight`` checks a server is ready for PITR; ``base_backup`` takes a physical base backup into the store
(from ``replication``, the replication protocol, or pg_basebackup) and verifies it, following the tar with
``tar``; ``restore_points`` creates and finds named restore points. A restore is ``planning`` (which base
backup, timeline and WAL), ``extract`` (into a new directory), ``recovery_config`` (postgresql.auto.conf,
recovery.signal, a trial of restore_command) and ``recovery`` (start the cluster, follow its log to the
target). ``retention`` expires base backups and the WAL only they needed.

Each task does one side-effecting step and returns a small typed value; the choices (which backup, which
WAL, which settings) are the pure functions of tasks/wal.py.
"""
