"""Real storage servers on loopback, started by the tests: OpenSSH's sshd and moto's S3 server.

Both run as the current user on free ports with everything (keys, config,
logs) in a temp dir; nothing on the system is reconfigured. A missing program
fails the test with a message saying to run `make setup`: never a silent skip.

The fixtures sshd_server and s3_server are tests/conftest.py's (one server each per session).
"""

from __future__ import annotations

import getpass
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import pytest
from support import free_port

SSHD = "/usr/sbin/sshd"
SFTP_SERVER = "/usr/lib/openssh/sftp-server"
SSH_KEYGEN = "/usr/bin/ssh-keygen"


def closed_port() -> int:
    """A loopback port nobody listens on (a host that is down, as far as a client can tell)."""
    return free_port()


def _wait_port(port: int, proc: subprocess.Popen, log: Path, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited {proc.returncode}: {log.read_text(errors='replace')[-3000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port} within {timeout:g} s: "
                       f"{log.read_text(errors='replace')[-3000:]}")


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            out.append(int(entry))
    return out


def _require(path: str, package: str) -> None:
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} is missing (Debian package {package}): run `make setup`, which installs it "
                    "through scripts/install-system-deps.sh", pytrace=False)


# ----------------------------------------------------------------------------------------------
# sshd


@dataclass
class Sshd:
    """A real OpenSSH server on 127.0.0.1 that accepts one generated client key for the current user."""

    dir: Path
    port: int = 0
    user: str = field(default_factory=getpass.getuser)
    proc: subprocess.Popen | None = None
    starts: int = 0

    @property
    def client_key(self) -> Path:
        return self.dir / "client_key"

    @property
    def other_key(self) -> Path:
        """A valid key that is not in authorized_keys: a login the server must refuse."""
        return self.dir / "other_key"

    @property
    def known_hosts(self) -> Path:
        return self.dir / "known_hosts"

    @property
    def log(self) -> Path:
        return self.dir / "sshd.log"

    @property
    def sftp_log(self) -> Path:
        """One line per SFTP request the server handled (open, fsync, close, posix-rename...)."""
        return self.dir / "sftp.log"

    def setup(self) -> Sshd:
        for name in ("host_key", "client_key", "other_key"):
            if not (self.dir / name).exists():
                subprocess.run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(self.dir / name)],
                               check=True)
        (self.dir / "authorized_keys").write_text((self.dir / "client_key.pub").read_text())
        self.port = self.port or free_port()
        host_pub = " ".join((self.dir / "host_key.pub").read_text().split()[:2])
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {host_pub}\n")
        # The subsystem line goes through the user's shell: the real sftp-server, its request log to a file.
        (self.dir / "sshd_config").write_text(f"""\
ListenAddress 127.0.0.1:{self.port}
HostKey {self.dir}/host_key
PidFile {self.dir}/sshd.pid
AuthorizedKeysFile {self.dir}/authorized_keys
AllowUsers {self.user}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM no
StrictModes no
PrintMotd no
PrintLastLog no
LogLevel VERBOSE
MaxStartups 50
Subsystem sftp {SFTP_SERVER} -e -l VERBOSE 2>>{self.sftp_log}
""")
        return self

    def start(self) -> Sshd:
        _require(SSHD, "openssh-server")
        _require(SFTP_SERVER, "openssh-sftp-server")
        if os.geteuid() == 0:
            # sshd started by root separates privileges into this directory (created by the
            # system's service at boot, which we do not run); it must exist, root-owned, 0755
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        # -D: stay in the foreground (our child); -e/-E: log to our file
        self.proc = subprocess.Popen([SSHD, "-D", "-f", str(self.dir / "sshd_config"), "-E", str(self.log)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(self.port, self.proc, self.log, "sshd")
        self.starts += 1
        return self

    def stop(self) -> None:
        """Kill the listener and every connection it serves (what a crash or reboot of the server does)."""
        if self.proc is None:
            return
        conns = _children(self.proc.pid)
        for pid in [self.proc.pid, *conns]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(10)
        self.proc = None

    def connections(self) -> list[int]:
        """The server processes of the open connections."""
        return _children(self.proc.pid) if self.proc else []

    def drop_connections(self) -> int:
        """Kill the server side of every open connection; the listener stays up. Returns how many."""
        assert self.proc is not None
        conns = _children(self.proc.pid)
        for pid in conns:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return len(conns)

    def outage(self, seconds: float) -> threading.Thread:
        """Down now (connections dropped, nothing listening), back on the same port after ``seconds``."""
        self.stop()

        def back() -> None:
            time.sleep(seconds)
            for attempt in range(20):   # an outgoing connection may hold the port for a moment
                try:
                    self.start()
                    return
                except RuntimeError:
                    if attempt == 19:
                        raise
                    time.sleep(0.5)
        t = threading.Thread(target=back, daemon=True)
        t.start()
        return t

    def logins(self) -> int:
        return self.log.read_text(errors="replace").count("Accepted publickey for")

    def url(self, path: str, key: Path | None = None, known_hosts: Path | None = None, port: int | None = None,
            **extra: str) -> str:
        opts = {"key_filename": str(key or self.client_key), "known_hosts": str(known_hosts or self.known_hosts),
                **extra}
        q = "&".join(f"{k}={quote(v, safe='/')}" for k, v in opts.items())
        return f"sftp://{self.user}@127.0.0.1:{port or self.port}{path}?{q}"


@pytest.fixture(scope="session")
def sshd_server(tmp_path_factory: pytest.TempPathFactory):
    _require(SSH_KEYGEN, "openssh-client")
    s = Sshd(tmp_path_factory.mktemp("sshd")).setup().start()
    yield s
    s.stop()


# ----------------------------------------------------------------------------------------------
# moto (S3)


@dataclass
class MotoS3:
    """moto's server mode on 127.0.0.1, with IAM authentication switched on.

    moto accepts any credentials unless INITIAL_NO_AUTH_ACTION_COUNT is set: then,
    after that many unauthenticated requests, every request must be signed with an
    access key that exists in its IAM. The first three requests create that user,
    its policy and its key; from then on a wrong key is refused like on AWS."""

    dir: Path
    port: int = 0
    proc: subprocess.Popen | None = None
    key_id: str = ""
    secret: str = ""

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.dir / "moto.log"

    def start(self) -> MotoS3:
        try:
            import moto.server  # noqa: F401
            import boto3  # noqa: F401
        except ImportError as exc:
            pytest.fail(f"moto[server] is not installed ({exc}): run `make setup`", pytrace=False)
        self.port = self.port or free_port()
        env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="3")
        with open(self.log, "a") as logf:
            self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                         env=env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        _wait_port(self.port, self.proc, self.log, "moto_server")
        self._make_user()
        return self

    def _make_user(self) -> None:
        import boto3
        iam = boto3.client("iam", endpoint_url=self.endpoint, region_name="us-east-1",
                           aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
        iam.create_user(UserName="bastion")
        iam.put_user_policy(UserName="bastion", PolicyName="s3-all", PolicyDocument=(
            '{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}'))
        key = iam.create_access_key(UserName="bastion")["AccessKey"]
        self.key_id, self.secret = key["AccessKeyId"], key["SecretAccessKey"]

    def client(self):  # type: ignore[no-untyped-def]
        import boto3
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=self.key_id, aws_secret_access_key=self.secret)

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def env(self) -> dict[str, str]:
        """Credentials the AWS way, and nothing from this machine's own AWS config."""
        return {"AWS_ACCESS_KEY_ID": self.key_id, "AWS_SECRET_ACCESS_KEY": self.secret,
                "AWS_DEFAULT_REGION": "us-east-1"}

    def url(self, bucket: str, prefix: str, **extra: str) -> str:
        q = "&".join(f"{k}={quote(v, safe=':/')}" for k, v in {"endpoint_url": self.endpoint, **extra}.items())
        return f"s3://{bucket}/{prefix}?{q}"

    def freeze(self, seconds: float) -> threading.Thread:
        """The server stops answering (SIGSTOP; its state survives) and resumes after ``seconds``."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

        def thaw() -> None:
            time.sleep(seconds)
            os.kill(self.proc.pid, signal.SIGCONT)  # type: ignore[union-attr]
        t = threading.Thread(target=thaw, daemon=True)
        t.start()
        return t

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.kill(self.proc.pid, signal.SIGCONT)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        self.proc = None


# Variables that would let the AWS SDK use this machine's own AWS setup, or probe the
# instance-metadata address (never a target here).
AWS_ISOLATION = {"AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": "/nonexistent/aws-config",
                 "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials"}
AWS_CLEARED = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
               "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ROLE_ARN",
               "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
               "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory):
    mp = pytest.MonkeyPatch()
    for k in AWS_CLEARED:
        mp.delenv(k, raising=False)
    for k, v in AWS_ISOLATION.items():
        mp.setenv(k, v)
    s = MotoS3(tmp_path_factory.mktemp("moto")).start()
    yield s
    s.stop()
    mp.undo()
