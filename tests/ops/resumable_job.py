"""A tiny resumable job for the submitter tests: counts steps, persisting the counter after each step.

It stands in for a training entrypoint: the state file plays the checkpoint, so a stopped or failed attempt
resubmitted under the same run name continues from the saved step instead of starting over.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def load(state: Path) -> dict:
    return json.loads(state.read_text()) if state.exists() else {"step": 0, "attempts": []}


def save(state: Path, data: dict) -> None:
    tmp = state.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, state)  # atomic: a stop mid-write never leaves a torn counter


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--state", type=Path, required=True, help="JSON file holding the step counter")
    p.add_argument("--steps", type=int, required=True, help="total steps of the run")
    p.add_argument("--sleep", type=float, default=0.2, help="seconds per step")
    p.add_argument("--fail-at", type=int, default=None, help="exit 1 when reaching this step on the first attempt")
    p.add_argument("--run-name", default=None, help="expected run name (checked against MPLUG2_RUN_NAME if set)")
    args = p.parse_args(argv)

    data = load(args.state)
    start = data["step"]
    env_run = os.environ.get("MPLUG2_RUN_NAME")
    data["attempts"].append({"start": start, "run_env": env_run, "run_arg": args.run_name})
    save(args.state, data)
    print(f"resumed from step {start}" if start else "starting at step 0", flush=True)
    for step in range(start + 1, args.steps + 1):
        time.sleep(args.sleep)
        if args.fail_at is not None and step == args.fail_at and len(data["attempts"]) == 1:
            print(f"injected failure at step {step}", flush=True)
            return 1
        data["step"] = step
        save(args.state, data)
        print(f"step {step}", flush=True)
    print(f"finished at step {data['step']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
