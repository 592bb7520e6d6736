"""Scheduled, incremental corpus preprocessing (a Kubernetes CronJob or cron submits this every tick).

Semantics a schedule needs:

- a tick with no new manifest rows writes nothing (``extend`` finds no rows after the last committed one);
- new rows become new shards after the highest committed shard id, keys continuing the numbering;
- two overlapping ticks never write the same shard: the dataset lease (``pipelines.shards``) admits one
  writer; the second tick reports "another run holds the lease" and exits 0, so the schedule stays green
  and the next tick picks up whatever is left.

    python -m jobs.schedule_preprocess --manifest s3://bucket/webvid/manifests/ --output s3://bucket/webvid/train \\
        --modality video

Submitted with a date-derived id (``mplug2-submit submit --run-name preprocess-webvid --date-id``), so a
duplicate tick meets the submitter's status check first.
"""

from __future__ import annotations

import logging
import sys

from mplug2.runtime import setup_process_env

log = logging.getLogger("mplug2.schedule")


def main(argv: list[str] | None = None) -> int:
    setup_process_env()
    from jobs.preprocess import build_parser
    from pipelines.cli import config_from_args
    from pipelines.errors import ConfigError
    from pipelines.run import preprocess
    from pipelines.lease import LeaseError

    parser = build_parser()
    parser.prog = "python -m jobs.schedule_preprocess"
    parser.description = __doc__.split("\n\n")[0]
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        print(f"schedule_preprocess: error: {exc}", file=sys.stderr)
        return 2
    config.mode = "extend"
    try:
        summary = preprocess(config)
    except LeaseError as exc:
        print(f"schedule_preprocess: another run holds the lease, nothing done this tick ({exc})")
        return 0
    except ConfigError as exc:
        print(f"schedule_preprocess: error: {exc}", file=sys.stderr)
        return 2
    if not summary.shards_written:
        print("schedule_preprocess: no new manifest rows; no shard written")
    print(summary.table(), flush=True)
    return summary.exit_code


if __name__ == "__main__":
    sys.exit(main())
