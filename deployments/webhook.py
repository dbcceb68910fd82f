"""`runbooks webhook`: the command line of the Alertmanager bridge (deployments/bridge/).

`runbooks webhook --routes FILE [--host H] [--port P] [--tls-cert F --tls-key F [--tls-client-ca F]]`; the
token comes from $RUNBOOKS_WEBHOOK_TOKEN or --token-file (exactly one of them), basic-auth users from
--basic-auth-file (``user:password`` lines): never from argv.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from deployments.bridge.app import create_app
from deployments.bridge.auth import parse_basic_auth_file, read_secret_file
from deployments.bridge.config import DEFAULT_MAX_BODY, BridgeConfig
from deployments.bridge.logs import log
from deployments.routes import load_routes, registry_destructive

DEFAULT_PORT = 9095
TOKEN_ENV = "RUNBOOKS_WEBHOOK_TOKEN"
TOKEN_FILE_ENV = "RUNBOOKS_WEBHOOK_TOKEN_FILE"
BASIC_AUTH_FILE_ENV = "RUNBOOKS_WEBHOOK_BASIC_AUTH_FILE"
ROUTES_ENV = "RUNBOOKS_ROUTES"


def default_routes_file() -> Path:
    return Path(__file__).resolve().parent / "routes.example.yaml"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="runbooks webhook", description="Alertmanager -> Prefect bridge.")
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--routes", default=os.environ.get(ROUTES_ENV),
                        help=f"routes file (default ${ROUTES_ENV}, else {default_routes_file().name})")
    parser.add_argument("--token-file", default=os.environ.get(TOKEN_FILE_ENV),
                        help=f"file holding the bearer token (or ${TOKEN_ENV}, or ${TOKEN_FILE_ENV})")
    parser.add_argument("--basic-auth-file", default=os.environ.get(BASIC_AUTH_FILE_ENV),
                        help="file of user:password lines for basic auth")
    parser.add_argument("--tls-cert", default=os.environ.get("RUNBOOKS_WEBHOOK_TLS_CERT"),
                        help="serve HTTPS with this certificate chain (PEM); needs --tls-key")
    parser.add_argument("--tls-key", default=os.environ.get("RUNBOOKS_WEBHOOK_TLS_KEY"),
                        help="the certificate's private key (PEM, a file only this user can read)")
    parser.add_argument("--tls-client-ca", default=os.environ.get("RUNBOOKS_WEBHOOK_TLS_CLIENT_CA"),
                        help="mutual TLS: accept only clients with a certificate signed by this CA (PEM)")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY)
    parser.add_argument("--respond-within", type=float, default=0.03,
                        help="seconds to wait for a run creation before answering it as pending (default 0.03)")
    parser.add_argument("--retry-for", type=float, default=900.0,
                        help="seconds a pending creation that fails is retried before it is reported (default 900)")
    parser.add_argument("--check", action="store_true", help="validate the routes file and exit")
    return parser


def config_from_args(args: argparse.Namespace) -> BridgeConfig:
    routes_path = Path(args.routes) if args.routes else default_routes_file()
    routes = load_routes(routes_path.read_text(), registry_destructive)
    tokens = []
    if os.environ.get(TOKEN_ENV) and args.token_file:
        raise ValueError(f"both ${TOKEN_ENV} and a token file ({args.token_file}) are set: the bridge accepts "
                         "exactly one bearer token; unset one")
    if os.environ.get(TOKEN_ENV):
        tokens.append(SecretStr(os.environ[TOKEN_ENV]))
        log.info("bearer token from $%s", TOKEN_ENV)
    if args.token_file:
        tokens.append(SecretStr(read_secret_file(args.token_file)))
        log.info("bearer token from %s", args.token_file)
    users = parse_basic_auth_file(read_secret_file(args.basic_auth_file)) if args.basic_auth_file else {}
    log.info("routes from %s: %s", routes_path, ", ".join(f"{r.name}->{r.deployment}" for r in routes))
    return BridgeConfig(routes=routes, tokens=tokens, basic_users=users, max_body_bytes=args.max_body_bytes,
                        respond_within=args.respond_within, retry_for=args.retry_for)


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv)[1:])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per runner poll otherwise
    try:
        config = config_from_args(args)
    except (OSError, ValueError) as exc:
        print(f"runbooks webhook: {exc}", file=sys.stderr)
        return 2
    if args.check:
        print(f"{len(config.routes)} routes OK")
        return 0
    import uvicorn

    try:
        app = create_app(config, freeze_heap=True)
    except ValueError as exc:
        print(f"runbooks webhook: {exc}", file=sys.stderr)
        return 2
    try:
        tls = tls_options(args.tls_cert, args.tls_key, args.tls_client_ca)
    except ValueError as exc:
        print(f"runbooks webhook: {exc}", file=sys.stderr)
        return 2
    if not tls and args.host not in ("127.0.0.1", "::1", "localhost"):
        log.warning("serving plain HTTP on %s: the bearer token crosses the network in clear; give --tls-cert "
                    "and --tls-key (or terminate TLS in front of the bridge)", args.host)
    log.info("Alertmanager bridge on %s://%s:%d/alertmanager%s -> %s", "https" if tls else "http", args.host,
             args.port, " (client certificates required)" if args.tls_client_ca else "",
             app.state.bridge.starter.api_url)
    uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, access_log=False, log_level="warning",
                                  lifespan="on", **tls)).run()
    return 0


def tls_options(cert: str | None, key: str | None, client_ca: str | None) -> dict[str, Any]:
    """uvicorn's TLS settings from --tls-cert/--tls-key/--tls-client-ca, each file checked readable first."""
    import ssl

    if not cert and not key:
        if client_ca:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is on top of HTTPS)")
        return {}
    if not (cert and key):
        raise ValueError("--tls-cert and --tls-key go together")
    for path in (cert, key, client_ca):
        if path and not os.access(path, os.R_OK):
            raise ValueError(f"cannot read {path}")
    try:  # a bad pair fails here, with the reason, rather than inside uvicorn's start-up
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        if client_ca:
            context.load_verify_locations(client_ca)
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(f"TLS certificate/key/CA not usable: {exc}") from None
    options: dict[str, Any] = {"ssl_certfile": cert, "ssl_keyfile": key}
    if client_ca:
        options |= {"ssl_ca_certs": client_ca, "ssl_cert_reqs": ssl.CERT_REQUIRED}
    return options
