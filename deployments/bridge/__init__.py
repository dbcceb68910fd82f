"""The Alertmanager bridge: an authenticated ASGI receiver that turns alerts into Prefect flow runs.

``POST /alertmanager`` takes Alertmanager's webhook payload (version 4). It requires a bearer token or
basic auth (what Alertmanager's ``http_config`` sends), compared in constant time (401 otherwise); a body
over the limit is 413, a malformed one 400 with the reason; bad input is never a 500. Alerts are routed
by the routes file (deployments/routes.py), and each (route, fingerprint, status, startsAt) starts at most
one flow run, ever: the run is created with a flow-run idempotency key derived from them, so repeats from
``repeat_interval``, retries, HA peers and bridge restarts all come back as the run the first created.
Runs of routes that require approval are created Paused with an input form: nothing happens until an
operator resumes them in the Prefect UI (the run is then scheduled and the runner picks it up), and
cancelling the paused run refuses it. ``/healthz`` and ``/metrics`` (Prometheus text format) need no auth.
Anything taken from a request that reaches a log line or an answer is cut and escaped (``routes.printable``).

Modules: ``config`` (BridgeConfig), ``auth`` (credentials), ``metrics``, ``runs`` (creating a flow run
through the Prefect API), ``approval`` (the paused state and its input form), ``dispatch`` (dedup cache,
cooldowns, background retries), ``app`` (the ASGI app); the command line is deployments/webhook.py.
"""
