"""A real OpenSSH server on loopback (Debian's openssh-server, run as a non-daemon on a free port, with a
generated host key, a generated client key and known_hosts), a stub `docker` on the sessions' PATH that
records its argv and simulates compose projects, and a real nginx (Debian's) with its own configuration.

The stub keeps its state in ``state.json`` beside ``argv.log``: ``up`` starts the services of a project
with the image their template in ``compose.json`` gives after substituting the env file's variables; an
image whose tag contains ``broken`` runs unhealthy, one tagged ``missing`` cannot be pulled.
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from pydantic import SecretStr

from blocks.ssh import SSHHost
from tasks.scratch import free_port

DOCKER_STUB = r'''#!/usr/bin/python3
import json, os, re, sys
state_dir = os.environ["RUNBOOKS_STUB_DIR"]
args = sys.argv[1:]
with open(os.path.join(state_dir, "argv.log"), "a") as log:
    log.write(json.dumps(args) + "\n")
if not args or args[0] != "compose":
    sys.exit("stub docker: only `docker compose` is simulated")
args = args[1:]
opts = {}
while args and args[0].startswith("-"):
    flag = args.pop(0)
    opts[flag] = args.pop(0)
command, rest = args[0], args[1:]
project = opts["-p"]
config = json.load(open(os.path.join(state_dir, "compose.json")))
state_path = os.path.join(state_dir, "state.json")
state = json.load(open(state_path)) if os.path.exists(state_path) else {}
env = {}
if opts.get("--env-file"):
    if not os.path.exists(opts["--env-file"]):
        sys.exit(f"couldn't find env file: {opts['--env-file']}")
    for line in open(opts["--env-file"]):
        key, sep, value = line.strip().partition("=")
        if sep:
            env[key] = value
names = [a for a in rest if not a.startswith("-") and a != "json"] or list(config["services"])
def image(service):
    return re.sub(r"\$\{(\w+)\}", lambda m: env.get(m.group(1), ""), config["services"][service])
if command == "pull":
    for service in names:
        if ":missing" in image(service):
            sys.exit(f"Error response from daemon: manifest for {image(service)} not found: manifest unknown")
elif command == "up":
    for service in names:
        img = image(service)
        state.setdefault(project, {})[service] = {"image": img, "state": "running",
                                                  "health": "unhealthy" if "broken" in img else "healthy"}
elif command == "stop":
    for service in state.get(project, {}).values():
        service["state"] = "exited"
elif command == "ps":
    for service, s in sorted(state.get(project, {}).items()):
        if service in names:
            print(json.dumps({"Service": service, "Image": s["image"], "State": s["state"], "Health": s["health"],
                              "Project": project}))
else:
    sys.exit(f"stub docker: compose {command} is not simulated")
with open(state_path + ".tmp", "w") as out:
    json.dump(state, out)
os.replace(state_path + ".tmp", state_path)
'''


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "runbooks-test", "-f", str(path)],
                   check=True, stdin=subprocess.DEVNULL)


class SshServer:
    """``with SshServer() as sshd:`` serves sshd on 127.0.0.1:<free port> as the current user."""

    def __init__(self) -> None:
        for binary in ("/usr/sbin/sshd", "ssh-keygen"):
            if shutil.which(binary) is None:
                raise RuntimeError(f"{binary} not found: apt-get install -y openssh-server (make system-deps)")
        self.dir = Path(tempfile.mkdtemp(prefix="runbooks-sshd-"))
        self.bin = self.dir / "bin"
        self.state = self.dir / "stub"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> SshServer:
        self.bin.mkdir()
        self.state.mkdir()
        docker = self.bin / "docker"
        docker.write_text(DOCKER_STUB)
        docker.chmod(0o755)
        (self.state / "compose.json").write_text(json.dumps({"services": {}}))
        _keygen(self.dir / "host_key")
        _keygen(self.dir / "other_host_key")
        _keygen(self.dir / "client_key")
        shutil.copy(self.dir / "client_key.pub", self.dir / "authorized_keys")
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
        self.port = free_port()
        config = self.dir / "sshd_config"
        config.write_text("\n".join([
            f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {self.dir / 'host_key'}",
            f"PidFile {self.dir / 'sshd.pid'}", f"AuthorizedKeysFile {self.dir / 'authorized_keys'}",
            "StrictModes no", "PasswordAuthentication no", "KbdInteractiveAuthentication no", "UsePAM no",
            "PermitRootLogin prohibit-password", "LogLevel ERROR",
            f"SetEnv PATH={self.bin}:/usr/sbin:/usr/bin:/sbin:/bin RUNBOOKS_STUB_DIR={self.state}",
            "Subsystem sftp /usr/lib/openssh/sftp-server", ""]))
        log = open(self.dir / "sshd.log", "wb")  # noqa: SIM115 - the child writes to it
        self.proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(config)], stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + 15
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited {self.proc.returncode}: {(self.dir / 'sshd.log').read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    if sock.recv(4).startswith(b"SSH-"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"sshd not listening: {(self.dir / 'sshd.log').read_text()}")
            time.sleep(0.05)
        return self

    def __exit__(self, *_exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)

    def known_hosts(self, key: str = "host_key") -> str:
        kind, blob, *_ = (self.dir / f"{key}.pub").read_text().split()
        return f"[127.0.0.1]:{self.port} {kind} {blob}\n"

    def block(self, known_hosts: str | None = None) -> SSHHost:
        return SSHHost(host="127.0.0.1", port=self.port, user=getpass.getuser(),
                       private_key=SecretStr((self.dir / "client_key").read_text()),
                       known_hosts=self.known_hosts() if known_hosts is None else known_hosts, connect_timeout=10)

    @property
    def private_key(self) -> str:
        return (self.dir / "client_key").read_text()

    # -- the stub's view ------------------------------------------------------------------------------------------

    def compose_services(self, services: dict[str, str]) -> None:
        """The images compose would use per service, with ${VAR} from the env file."""
        (self.state / "compose.json").write_text(json.dumps({"services": services}))

    def argv_log(self) -> list[list[str]]:
        path = self.state / "argv.log"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def containers(self) -> dict[str, dict[str, dict[str, str]]]:
        path = self.state / "state.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def set_containers(self, state: dict[str, dict[str, dict[str, str]]]) -> None:
        (self.state / "state.json").write_text(json.dumps(state))


class Nginx:
    """Debian's nginx on a free loopback port, proxying to whatever ``upstream.conf`` names."""

    def __init__(self, directory: Path, upstream: str) -> None:
        if shutil.which("nginx") is None:
            raise RuntimeError("nginx not found: apt-get install -y nginx (make system-deps)")
        self.dir = directory
        self.port = free_port()
        self.upstream = directory / "upstream.conf"
        self.upstream.write_text(upstream)
        tmp = directory / "tmp"
        tmp.mkdir()
        self.config = directory / "nginx.conf"
        self.config.write_text(f"""daemon off;
master_process on;
worker_processes 1;
user root;
pid {directory}/nginx.pid;
error_log {directory}/error.log;
events {{ worker_connections 64; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy; fastcgi_temp_path {tmp}/fastcgi;
  uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
  include {self.upstream};
  server {{ listen 127.0.0.1:{self.port}; location / {{ proxy_pass http://app; }} }}
}}
""")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def argv(self) -> list[str]:
        """How the runbook calls this nginx (its own configuration and error log)."""
        return ["nginx", "-c", str(self.config), "-e", str(self.dir / "error.log")]

    def __enter__(self) -> Nginx:
        self.proc = subprocess.Popen([*self.argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     stdin=subprocess.DEVNULL, env={**os.environ})
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"nginx did not start: {(self.dir / 'error.log').read_text()}") from None
                time.sleep(0.05)

    def __exit__(self, *_exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
