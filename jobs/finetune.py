"""``ray job submit`` entrypoint for finetuneing: a thin wrapper over ``mplug2-train finetune``.

    mplug2-submit submit --run-name my-run --runtime-env finetune -- \\
        python -m jobs.finetune --config configs/retrieval_tiny.yaml --run-name my-run --storage s3://bucket/runs

Inside a job the driver connects to the job's cluster (Ray sets ``RAY_ADDRESS``). Submitting again with the
same ``--run-name`` and storage resumes from the newest valid checkpoint.
"""

from __future__ import annotations

import sys

from mplug2.train.cli import main as train_main


def main(argv: list[str] | None = None) -> int:
    return train_main(["finetune", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
