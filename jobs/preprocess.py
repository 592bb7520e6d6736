"""``ray job submit`` entrypoint for corpus preprocessing: a thin wrapper over :func:`pipelines.run.preprocess`.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m jobs.preprocess --manifest s3://bucket/cc3m.parquet --output s3://bucket/cc3m/train

Inside a job the driver connects to the job's cluster (``RAY_ADDRESS`` is set by Ray); the flags are those
of ``mplug2-data shard``. Exit status: 0 ok, 1 failure ratio over ``--max-failure-ratio``, 2 config error
or failed shards.
"""

from __future__ import annotations

import argparse
import logging
import sys

from mplug2.runtime import setup_process_env


def build_parser() -> argparse.ArgumentParser:
    from pipelines.cli import add_config_flags

    p = argparse.ArgumentParser(prog="python -m jobs.preprocess",
                                description="Preprocess manifests into WebDataset shards on the Ray cluster "
                                            "this job runs on (same flags as `mplug2-data shard`).")
    p.add_argument("--config", help="YAML file of PreprocessConfig fields (flags override it)")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--run-name", help="a label for logs and job ids (the output prefix identifies the dataset)")
    p.set_defaults(local=False)
    add_config_flags(p)
    return p


def main(argv: list[str] | None = None) -> int:
    setup_process_env()
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.run_name:
        logging.getLogger("mplug2.preprocess").info("run %s", args.run_name)
    from pipelines.cli import config_from_args
    from pipelines.errors import ConfigError
    from pipelines.run import preprocess
    from pipelines.lease import LeaseError

    from mplug2.storage import StorageCredentialsError

    try:
        config = config_from_args(args)
        config.executor = "ray"
        config.progress = False if config.progress is None else config.progress
        summary = preprocess(config)
    except (ConfigError, LeaseError, StorageCredentialsError) as exc:
        print(f"preprocess: error: {exc}", file=sys.stderr)
        return 2
    print(summary.table(), flush=True)
    return summary.exit_code


if __name__ == "__main__":
    sys.exit(main())
