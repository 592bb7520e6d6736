"""``mplug2-submit``: submit Ray jobs with deterministic ids, so a resubmit resumes instead of duplicating.

Ray runs a job once to completion or failure and leaves retries to the submitter; a reused submission id is
rejected ("Job with submission_id ... already exists"). We turn that into a protocol keyed on a stable *run
name* (training-and-ops.md §5):

- the first attempt's submission id is ``<run>``, later ones ``<run>-r<n>``;
- latest attempt ``PENDING``/``RUNNING`` -> "already running" (exit 0), ``SUCCEEDED`` -> "done" (exit 0),
  ``FAILED``/``STOPPED`` -> submit ``<run>-r<n+1>``; the entrypoint resumes from its checkpoint because the run
  name (hence ``RunConfig(name, storage_path)``) is unchanged;
- two submits racing for the same id (ray#31356) re-read the status once after a short backoff.

Exit codes (stable, for scripts and CronJobs) are the ``EXIT_*`` constants below.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import os
import random
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

from mplug2.runtime import CREDENTIAL_FILE_ENV, DEFAULT_ENV, SECRET_ENV, forwarded_env, setup_process_env

log = logging.getLogger("mplug2.submit")

REPO_ROOT = Path(__file__).resolve().parents[1]
RUNTIME_ENV_DIR = REPO_ROOT / "jobs" / "runtime_env"
DEFAULT_ADDRESS = "http://127.0.0.1:8265"

# Paths never shipped with working_dir: environments, data, outputs, caches (Ray also honours .gitignore).
DEFAULT_EXCLUDES = (
    ".venv", "outputs", ".s3", "bench/.cache", ".git", "runs", "**/__pycache__", ".pytest_cache",
    "*.egg-info", "build", "dist",
)
# Credential values never reach a job: Ray logs runtime-env variables in plain text. --forward-credentials
# forwards the *path* of a 0600 credentials file (AWS_SHARED_CREDENTIALS_FILE), readable on the cluster's nodes.
CREDENTIAL_VARS = frozenset(SECRET_ENV)
# Whole name segments, so TOKENIZERS_PARALLELISM is not a "token" but GITHUB_TOKEN and AWS_SECRET_ACCESS_KEY are.
_SECRET_NAME = re.compile(
    r"(?:^|_)(SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIALS?|ACCESS_KEY|PRIVATE_KEY|API_KEY)(?:_|$)", re.I)

RUN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
METADATA_KEY = "mplug2_run"

EXIT_OK = 0            # submitted, already running, or done
EXIT_JOB_FAILED = 1    # a followed job ended FAILED/STOPPED
EXIT_USAGE = 2         # bad arguments or configuration (argparse uses 2 as well)
EXIT_UNREACHABLE = 3   # no Ray job server at the address
EXIT_NOT_FOUND = 4     # no attempt of this run exists

ACTIVE = ("PENDING", "RUNNING")
TERMINAL_RETRY = ("FAILED", "STOPPED")


class SubmitError(RuntimeError):
    """A failure the CLI reports as one line with a specific exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE):
        super().__init__(message)
        self.exit_code = exit_code


# ----------------------------------------------------------------------------------------------- naming


def validate_run_name(run: str) -> str:
    """Run names become submission ids, Ray Train run dirs and Kubernetes-ish names: keep them plain."""
    if not RUN_NAME_RE.match(run):
        raise SubmitError(
            f"invalid run name {run!r}: use 1-100 characters from [A-Za-z0-9._-], starting with a letter or digit"
        )
    return run


def dated_run_name(run: str, date: str | None) -> str:
    """``preprocess-cc3m`` + ``20260812`` -> ``preprocess-cc3m-20260812`` (scheduled runs: one id per day).

    ``date`` is ``YYYYMMDD``, ``YYYY-MM-DD`` or ``today`` (UTC), so a CronJob tick and its retries map to one id.
    """
    if date is None:
        return run
    if date == "today":
        day = dt.datetime.now(dt.timezone.utc).date()
    else:
        try:
            day = dt.datetime.strptime(date.replace("-", ""), "%Y%m%d").date()
        except ValueError:
            raise SubmitError(f"--date-id {date!r}: expected YYYYMMDD, YYYY-MM-DD or 'today'") from None
    return f"{run}-{day:%Y%m%d}"


def submission_id(run: str, attempt: int) -> str:
    """Attempt 0 is ``<run>``, attempt n is ``<run>-r<n>``."""
    return run if attempt == 0 else f"{run}-r{attempt}"


def attempt_of(run: str, sid: str | None) -> int | None:
    """Inverse of :func:`submission_id`; ``None`` when ``sid`` is not an attempt of ``run``."""
    if sid == run:
        return 0
    if sid and sid.startswith(run + "-r"):
        tail = sid[len(run) + 2:]
        if tail.isdigit() and not tail.startswith("0"):
            return int(tail)
    return None


@dataclass(frozen=True)
class Attempt:
    """One Ray job of a run, as listed by the job server."""

    submission_id: str
    attempt: int
    status: str
    message: str = ""
    start_time: int | None = None
    end_time: int | None = None


def attempts_of(run: str, jobs: Iterable[Any]) -> list[Attempt]:
    """The attempts of ``run`` among ``list_jobs()`` results, oldest first.

    A job belongs to the run when its metadata names it, or (jobs submitted with plain ``ray job submit``) when it
    has no run metadata and its id has the ``<run>``/``<run>-r<n>`` shape; a run literally named ``x-r1`` is thus
    not mistaken for attempt 1 of ``x`` when both were submitted by us.
    """
    out = []
    for job in jobs:
        sid = getattr(job, "submission_id", None)
        n = attempt_of(run, sid)
        if n is None:
            continue
        owner = (getattr(job, "metadata", None) or {}).get(METADATA_KEY)
        if owner is not None and owner != run:
            continue
        status = getattr(job.status, "value", str(job.status))
        out.append(Attempt(sid, n, status, job.message or "", job.start_time, job.end_time))
    return sorted(out, key=lambda a: a.attempt)


# ------------------------------------------------------------------------------------------ runtime env


def resolve_address(cli_address: str | None) -> str:
    """``--address``, else ``RAY_API_SERVER_ADDRESS``, else ``RAY_ADDRESS``, else the local dashboard."""
    address = cli_address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address or address == "auto":
        return DEFAULT_ADDRESS
    if address.startswith("ray://"):
        raise SubmitError(f"{address}: job submission needs the dashboard HTTP address (http://<head>:8265)")
    if "://" not in address:
        address = f"http://{address}"
    return address


def load_runtime_env_file(path: str | Path | None) -> dict[str, Any]:
    """Read a runtime_env YAML; a bare name (``pretrain``) means ``jobs/runtime_env/<name>.yaml``."""
    if path is None:
        return {}
    p = Path(path)
    if not p.suffix and not p.exists():
        p = RUNTIME_ENV_DIR / f"{p}.yaml"
    if not p.is_file():
        raise SubmitError(f"runtime env file not found: {p}")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise SubmitError(f"{p}: a runtime env must be a mapping, got {type(data).__name__}")
    for key in (data.get("env_vars") or {}):
        if key in CREDENTIAL_VARS or _SECRET_NAME.search(key):
            raise SubmitError(f"{p}: env_vars.{key} looks like a credential; credentials never go into files")
    return data


@dataclass
class RuntimeEnvSpec:
    """How the job's runtime_env is assembled from a file, the repository and the submitter's environment."""

    file: str | None = None
    working_dir: str | None = None          # default: the repository root
    forward_credentials: bool = False
    extra_env: dict[str, str] = field(default_factory=dict)


def build_runtime_env(spec: RuntimeEnvSpec, *, run: str) -> dict[str, Any]:
    """The runtime_env dict handed to Ray.

    ``env_vars`` = file values < forwarded process env (S3 endpoint, region, offline flags) < ``extra_env``, plus
    ``RAY_AUTH_MODE`` (the mode this submitter talks to the cluster with, so the driver's ``ray.init`` agrees) and
    ``MPLUG2_RUN_NAME``. Credential values are never included; ``forward_credentials`` adds the credentials
    file's path (``AWS_SHARED_CREDENTIALS_FILE``, ``AWS_PROFILE``), which the job's nodes must be able to read.
    """
    env = load_runtime_env_file(spec.file)
    # A checkout ships itself; an installed package (the container image) has its code on every node already,
    # and shipping site-packages as working_dir would be wrong.
    working_dir = spec.working_dir or env.get("working_dir") or (str(REPO_ROOT) if is_checkout() else None)
    if working_dir is not None and "://" not in str(working_dir) and not Path(working_dir).is_dir():
        raise SubmitError(f"working_dir {working_dir!r} is not a directory")
    excludes = list(dict.fromkeys([*DEFAULT_EXCLUDES, *(env.get("excludes") or [])]))
    forwarded = forwarded_env()              # never holds key values (mplug2.runtime.SECRET_ENV)
    if spec.forward_credentials:
        check_credentials_file()
    else:
        forwarded = {k: v for k, v in forwarded.items() if k not in CREDENTIAL_FILE_ENV}
    env_vars = {
        **{k: str(v) for k, v in (env.get("env_vars") or {}).items()},
        **forwarded,
        "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", DEFAULT_ENV["RAY_AUTH_MODE"]),
        **spec.extra_env,
        "MPLUG2_RUN_NAME": run,
    }
    out = {k: v for k, v in env.items() if k not in ("working_dir", "excludes", "env_vars")}
    if working_dir is not None:
        out.update(working_dir=str(working_dir), excludes=excludes)
    out.update(env_vars=env_vars)
    return out


def is_checkout() -> bool:
    """True when this code runs from a source checkout (not from an installed wheel)."""
    return (REPO_ROOT / "pyproject.toml").is_file()


def check_credentials_file() -> str:
    """The credentials file ``--forward-credentials`` names to the job: set, existing here, mode 0600."""
    path = os.environ.get("AWS_SHARED_CREDENTIALS_FILE")
    if not path:
        held = [k for k in SECRET_ENV if os.environ.get(k)]
        hint = (f" ({', '.join(held)} are set, but values are never forwarded: Ray logs runtime-env variables)"
                if held else "")
        raise SubmitError("--forward-credentials forwards a credentials file by path: set "
                          f"AWS_SHARED_CREDENTIALS_FILE to a 0600 file the cluster's nodes can read{hint}; "
                          "`eval \"$(mplug2-s3 env --dir .s3)\"` sets it for the embedded S3")
    if not os.path.isfile(path):
        raise SubmitError(f"AWS_SHARED_CREDENTIALS_FILE={path} does not exist")
    if os.stat(path).st_mode & 0o077:
        raise SubmitError(f"{path} is readable by other users: chmod 600 {path}")
    return path


def mask_secrets(obj: Any) -> Any:
    """A copy of ``obj`` with credential-looking values replaced, for anything we print or log."""
    if isinstance(obj, dict):
        return {
            k: ("***" if isinstance(k, str) and (k in CREDENTIAL_VARS or _SECRET_NAME.search(k)) else mask_secrets(v))
            for k, v in obj.items()
        }
    if isinstance(obj, list):
        return [mask_secrets(v) for v in obj]
    return obj


def render_entrypoint(argv: Sequence[str], run: str) -> str:
    """Join the entrypoint argv (after ``--``) into one shell string; ``{run_name}`` becomes the run name."""
    if not argv:
        raise SubmitError("no entrypoint: pass the command after '--', e.g. -- python -m jobs.preprocess --help")
    return shlex.join(a.replace("{run_name}", run) for a in argv)


# -------------------------------------------------------------------------------------------- submitter


@dataclass
class Outcome:
    """What ``submit`` did: ``submitted``, ``already_running`` or ``done``."""

    action: str
    run: str
    submission_id: str
    status: str | None = None

    def line(self) -> str:
        text = {"submitted": "submitted", "already_running": "already running", "done": "done"}[self.action]
        return f"{text}: run={self.run} submission_id={self.submission_id}" + (
            f" status={self.status}" if self.status else "")


class Submitter:
    """The run-name protocol over :class:`ray.job_submission.JobSubmissionClient`."""

    def __init__(self, address: str | None = None, *, client: Any = None, race_backoff_s: float = 1.0):
        setup_process_env()
        self.address = resolve_address(address)
        # Ray's client prefers $RAY_API_SERVER_ADDRESS / $RAY_ADDRESS over its argument; our order (--address
        # first) must be the one that talks to the server, and every message names that address.
        os.environ["RAY_API_SERVER_ADDRESS"] = self.address
        self.race_backoff_s = race_backoff_s
        if client is None:
            from ray.job_submission import JobSubmissionClient

            try:
                client = JobSubmissionClient(self.address)
            except ConnectionError as e:
                raise SubmitError(f"no Ray job server at {self.address}: {e}", EXIT_UNREACHABLE) from None
            except RuntimeError as e:  # e.g. ray[default] missing, auth mismatch
                raise SubmitError(f"cannot use the Ray job server at {self.address}: {e}", EXIT_UNREACHABLE) from None
        self.client = client

    # -- reads
    def attempts(self, run: str) -> list[Attempt]:
        return attempts_of(run, self.client.list_jobs())

    def latest(self, run: str) -> Attempt:
        attempts = self.attempts(run)
        if not attempts:
            raise SubmitError(f"no job for run {run!r} at {self.address}", EXIT_NOT_FOUND)
        return attempts[-1]

    # -- submit
    def submit(self, run: str, entrypoint: Sequence[str], *, runtime_env: dict[str, Any],
               entrypoint_num_cpus: float | None = None, entrypoint_num_gpus: float | None = None,
               entrypoint_memory: int | None = None, entrypoint_resources: dict[str, float] | None = None,
               ) -> Outcome:
        """Submit the next attempt of ``run`` unless one is active or done. Safe to call repeatedly."""
        validate_run_name(run)
        command = render_entrypoint(entrypoint, run)
        for race in range(2):
            attempts = self.attempts(run)
            if attempts:
                last = attempts[-1]
                if last.status in ACTIVE:
                    return Outcome("already_running", run, last.submission_id, last.status)
                if last.status == "SUCCEEDED":
                    return Outcome("done", run, last.submission_id, last.status)
                sid = submission_id(run, last.attempt + 1)
                log.info("latest attempt %s is %s; submitting %s (resumes from the run's checkpoint)",
                         last.submission_id, last.status, sid)
            else:
                sid = submission_id(run, 0)
            try:
                self.client.submit_job(
                    entrypoint=command, submission_id=sid, runtime_env=runtime_env,
                    metadata={METADATA_KEY: run}, entrypoint_num_cpus=entrypoint_num_cpus,
                    entrypoint_num_gpus=entrypoint_num_gpus, entrypoint_memory=entrypoint_memory,
                    entrypoint_resources=entrypoint_resources,
                )
                log.info("submitted %s: %s", sid, command)
                return Outcome("submitted", run, sid, "PENDING")
            except RuntimeError as e:
                if "already exists" not in str(e) or race:
                    raise SubmitError(f"submitting {sid} failed: {e}", EXIT_JOB_FAILED) from None
                delay = self.race_backoff_s * (1 + random.random())
                log.warning("%s was submitted concurrently by someone else; re-reading status in %.1f s", sid, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    # -- follow / logs / stop
    def follow(self, sid: str, out=sys.stdout) -> str:
        """Stream the job's logs until it ends; returns its final status."""

        async def _tail() -> None:
            async for chunk in self.client.tail_job_logs(sid):
                out.write(chunk)
                out.flush()

        asyncio.run(_tail())
        for _ in range(60):  # the log stream can close a moment before the status turns terminal
            status = self.client.get_job_status(sid).value
            if status not in ACTIVE:
                return status
            time.sleep(0.5)
        return status

    def logs(self, run: str) -> tuple[Attempt, str]:
        last = self.latest(run)
        return last, self.client.get_job_logs(last.submission_id)

    def stop(self, run: str) -> tuple[Attempt, bool]:
        last = self.latest(run)
        if last.status not in ACTIVE:
            return last, False
        return last, bool(self.client.stop_job(last.submission_id))

    def runs(self) -> list[dict[str, Any]]:
        """One row per run (from our metadata) with its latest attempt; plain Ray jobs are listed by id."""
        rows: dict[str, dict[str, Any]] = {}
        for job in self.client.list_jobs():
            sid = job.submission_id or job.job_id
            run = (job.metadata or {}).get(METADATA_KEY) or sid
            n = attempt_of(run, sid) or 0
            status = getattr(job.status, "value", str(job.status))
            row = rows.setdefault(run, {"run": run, "attempts": 0, "latest": sid, "status": status, "_n": -1})
            row["attempts"] += 1
            if n > row["_n"]:
                row.update(latest=sid, status=status, _n=n)
        return [{k: v for k, v in r.items() if k != "_n"} for r in sorted(rows.values(), key=lambda r: r["run"])]


# ---------------------------------------------------------------------------------------------- CLI


def _parse_resources(text: str | None) -> dict[str, float] | None:
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise SubmitError(f"--entrypoint-resources must be JSON, e.g. '{{\"accel\": 1}}': {e}") from None
    if not isinstance(value, dict) or not all(isinstance(v, (int, float)) for v in value.values()):
        raise SubmitError("--entrypoint-resources must be a JSON object of numbers")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mplug2-submit",
        description="Submit and manage Ray jobs by run name. Resubmitting a failed or stopped run submits "
                    "<run>-r<n+1>, which resumes from the run's checkpoint; an active or finished run is left alone.",
        epilog="exit codes: 0 ok (submitted / already running / done), 1 followed job failed or submit error, "
               "2 usage or config error, 3 job server unreachable, 4 run not found",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    def with_address(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--address", help="Ray dashboard address (default: $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS, "
                                          f"then {DEFAULT_ADDRESS})")
        return sp

    s = with_address(sub.add_parser("submit", help="submit the next attempt of a run (idempotent)",
                                    description="Everything after '--' is the entrypoint; '{run_name}' in it is "
                                                "replaced by the (dated) run name."))
    s.add_argument("--run-name", required=True, help="stable run name; the first submission id is this name")
    s.add_argument("--date-id", nargs="?", const="today", metavar="YYYYMMDD",
                   help="append a date to the run name (scheduled runs): <run>-YYYYMMDD; no value = today (UTC)")
    s.add_argument("--runtime-env", metavar="YAML",
                   help="runtime_env YAML, or a name under jobs/runtime_env/ (preprocess, pretrain, ...)")
    s.add_argument("--working-dir", help="directory shipped to the cluster (default: this repository when run "
                                         "from a checkout; none when installed, e.g. in the container image)")
    s.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra env var for the job")
    s.add_argument("--forward-credentials", action="store_true",
                   help="forward the path in AWS_SHARED_CREDENTIALS_FILE (+ AWS_PROFILE) to the job, for nodes without "
                        "an instance role or credentials of their own; the file must be 0600 and readable on the "
                        "nodes. Key values are never forwarded (Ray logs runtime-env variables)")
    s.add_argument("--entrypoint-num-cpus", type=float, help="CPUs reserved for the driver (preprocessing drivers)")
    s.add_argument("--entrypoint-num-gpus", type=float, help="GPUs reserved for the driver")
    s.add_argument("--entrypoint-memory", type=int, help="memory (bytes) reserved for the driver")
    s.add_argument("--entrypoint-resources", help="custom resources for the driver, JSON")
    s.add_argument("--follow", action="store_true", help="stream logs until the job ends; exit 1 unless it succeeds")
    s.add_argument("--dry-run", action="store_true", help="print the submission (secrets masked) and exit")
    s.add_argument("entrypoint", nargs=argparse.REMAINDER, help="-- command to run")

    for name, text in (("status", "latest attempt's status"), ("stop", "stop the latest attempt if it is active")):
        sp = with_address(sub.add_parser(name, help=text))
        sp.add_argument("run")
        if name == "status":
            sp.add_argument("--json", action="store_true", help="print all attempts as JSON")
    lg = with_address(sub.add_parser("logs", help="logs of the latest attempt"))
    lg.add_argument("run")
    lg.add_argument("--follow", action="store_true", help="stream until the job ends")
    ls = with_address(sub.add_parser("list", help="runs on the cluster with their latest attempt"))
    ls.add_argument("--json", action="store_true")
    return p


def _cmd_submit(args: argparse.Namespace) -> int:
    entrypoint = args.entrypoint[1:] if args.entrypoint[:1] == ["--"] else args.entrypoint
    run = validate_run_name(dated_run_name(validate_run_name(args.run_name), args.date_id))
    extra = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SubmitError(f"--env {item!r}: expected KEY=VALUE")
        extra[key] = value
    spec = RuntimeEnvSpec(args.runtime_env, args.working_dir, args.forward_credentials, extra)
    runtime_env = build_runtime_env(spec, run=run)
    command = render_entrypoint(entrypoint, run)
    if args.dry_run:
        print(json.dumps({"address": resolve_address(args.address), "run": run, "entrypoint": command,
                          "runtime_env": mask_secrets(runtime_env)}, indent=2))
        return EXIT_OK
    log.debug("runtime_env: %s", mask_secrets(runtime_env))
    sub = Submitter(args.address)
    outcome = sub.submit(
        run, entrypoint, runtime_env=runtime_env, entrypoint_num_cpus=args.entrypoint_num_cpus,
        entrypoint_num_gpus=args.entrypoint_num_gpus, entrypoint_memory=args.entrypoint_memory,
        entrypoint_resources=_parse_resources(args.entrypoint_resources),
    )
    print(outcome.line(), flush=True)
    if args.follow and outcome.action != "done":
        status = sub.follow(outcome.submission_id)
        print(f"finished: run={run} submission_id={outcome.submission_id} status={status}", flush=True)
        return EXIT_OK if status == "SUCCEEDED" else EXIT_JOB_FAILED
    return EXIT_OK


def _run(args: argparse.Namespace) -> int:
    if args.command == "submit":
        return _cmd_submit(args)
    sub = Submitter(args.address)
    if args.command == "status":
        if args.json:
            attempts = sub.attempts(args.run)
            if not attempts:
                raise SubmitError(f"no job for run {args.run!r} at {sub.address}", EXIT_NOT_FOUND)
            print(json.dumps([a.__dict__ for a in attempts], indent=2))
            return EXIT_OK
        last = sub.latest(args.run)
        print(f"run={args.run} submission_id={last.submission_id} attempt={last.attempt} status={last.status}"
              + (f" message={last.message!r}" if last.message else ""))
        return EXIT_OK
    if args.command == "logs":
        if args.follow:
            last = sub.latest(args.run)
            status = sub.follow(last.submission_id)
            return EXIT_OK if status == "SUCCEEDED" else EXIT_JOB_FAILED
        _, text = sub.logs(args.run)
        sys.stdout.write(text)
        return EXIT_OK
    if args.command == "stop":
        last, stopped = sub.stop(args.run)
        print(f"{'stop requested' if stopped else 'not active'}: run={args.run} "
              f"submission_id={last.submission_id} status={last.status}")
        return EXIT_OK
    if args.command == "list":
        rows = sub.runs()
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            print(f"{'RUN':40} {'ATTEMPTS':>8}  {'LATEST':44} STATUS")
            for r in rows:
                print(f"{r['run']:40} {r['attempts']:>8}  {r['latest']:44} {r['status']}")
        return EXIT_OK
    raise SubmitError(f"unknown command {args.command}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return _run(args)
    except SubmitError as e:
        print(f"mplug2-submit: error: {e}", file=sys.stderr)
        return e.exit_code
    except _connection_errors() as e:   # the job server went away mid-command (e.g. during --follow)
        address = os.environ.get("RAY_API_SERVER_ADDRESS") or resolve_address(getattr(args, "address", None))
        print(f"mplug2-submit: error: lost the Ray job server at {address} ({type(e).__name__}); the job itself "
              f"may still be running: check with `mplug2-submit status` once the server is back", file=sys.stderr)
        return EXIT_UNREACHABLE


def _connection_errors() -> tuple[type[BaseException], ...]:
    """What Ray's job client raises when the server stops answering (requests, aiohttp, sockets)."""
    import aiohttp
    import requests

    return (ConnectionError, requests.exceptions.ConnectionError, aiohttp.ClientConnectionError)


if __name__ == "__main__":
    sys.exit(main())
