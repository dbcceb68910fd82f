"""SSH host Block: address, user, a private key or password (secrets), and the host keys to trust.

Unknown and changed host keys are refused: the Block's ``known_hosts`` content is the only trust there is
(no ~/.ssh/known_hosts, no agent, no keys found on disk).
"""

from __future__ import annotations

import io

import paramiko
from paramiko.hostkeys import HostKeyEntry, InvalidHostKey
from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from blocks._reference import REFERENCEABLE
from blocks._secret import OptionalSecret
from blocks.errors import ConfigurationError, ConnectionFailed


class HostKeyRejected(ConnectionFailed):
    """The server's host key is unknown or differs from known_hosts; nothing was sent to the host."""


_KEY_TYPES: tuple[type[paramiko.PKey], ...] = (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey)


class SSHHost(Block):
    """A host the runbooks reach over SSH (docker compose, nginx)."""

    model_config = REFERENCEABLE
    _block_type_name = "SSH Host"
    _description = "An SSH host: address, user, private key or password (secret), known_hosts content."

    host: str
    port: int = Field(default=22, ge=1, le=65535)
    user: str = Field(default="root")
    private_key: SecretStr | None = Field(default=None, description="OpenSSH private key (PEM/OpenSSH text).")
    private_key_passphrase: OptionalSecret = None
    password: OptionalSecret = None
    known_hosts: str = Field(description="known_hosts lines for this host (ssh-keyscan -p PORT HOST, checked "
                                         "out of band). Keys not listed here are refused.")
    connect_timeout: float = Field(default=10, gt=0)

    def describe(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"

    def _host_keys(self) -> list[HostKeyEntry]:
        entries = []
        for number, line in enumerate(self.known_hosts.splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                entry = HostKeyEntry.from_line(line, lineno=number)
            except InvalidHostKey:
                raise ConfigurationError(f"known_hosts line {number} is not a host key line") from None
            if entry is not None:
                entries.append(entry)
        if not entries:
            raise ConfigurationError(f"SSHHost {self.describe()}: known_hosts is empty; every host key would be "
                                     "refused (add the output of ssh-keyscan, checked out of band)")
        return entries

    def _pkey(self) -> paramiko.PKey | None:
        if self.private_key is None:
            return None
        text = self.private_key.get_secret_value()
        passphrase = self.private_key_passphrase.get_secret_value() if self.private_key_passphrase else None
        for key_type in _KEY_TYPES:
            try:
                return key_type.from_private_key(io.StringIO(text), password=passphrase)
            except (paramiko.SSHException, ValueError):
                continue
        raise ConfigurationError(f"SSHHost {self.describe()}: the private key is not an Ed25519, ECDSA or RSA key "
                                 "paramiko can read (or its passphrase is wrong)")

    def connect(self) -> paramiko.SSHClient:
        """A connected paramiko client; the key/password is unwrapped only here and never logged."""
        if self.private_key is None and self.password is None:
            raise ConfigurationError(f"SSHHost {self.describe()}: give a private key or a password")
        client = paramiko.SSHClient()
        known = client.get_host_keys()
        for entry in self._host_keys():
            for name in entry.hostnames:
                known.add(name, entry.key.get_name(), entry.key)
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        try:
            client.connect(self.host, port=self.port, username=self.user, pkey=self._pkey(),
                           password=self.password.get_secret_value() if self.password else None,
                           timeout=self.connect_timeout, banner_timeout=self.connect_timeout,
                           auth_timeout=self.connect_timeout, allow_agent=False, look_for_keys=False)
        except paramiko.BadHostKeyException as exc:
            client.close()
            raise HostKeyRejected(
                f"host key of {self.describe()} CHANGED: it offered {exc.key.get_name()} "
                f"{exc.key.fingerprint}, known_hosts has {exc.expected_key.fingerprint}; refused before any "
                "command ran (check the host out of band, then update known_hosts)") from None
        except paramiko.AuthenticationException:
            client.close()
            raise ConnectionFailed(f"{self.describe()} refused the credentials; nothing was run") from None
        except paramiko.SSHException as exc:
            client.close()
            if "known_hosts" in str(exc) or "not found in" in str(exc):
                raise HostKeyRejected(f"host key of {self.describe()} is not in the Block's known_hosts; refused "
                                      "before any command ran") from None
            raise ConnectionFailed(f"SSH to {self.describe()} failed: {type(exc).__name__}: {exc}") from None
        except OSError as exc:
            client.close()
            raise ConnectionFailed(f"SSH to {self.describe()} failed: {exc}") from None
        return client
