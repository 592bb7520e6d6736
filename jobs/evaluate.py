"""``ray job submit`` entrypoint for evaluation: a thin wrapper over ``mplug2-train evaluate``.

    python -m jobs.evaluate --task retrieval --model s3://bucket/runs/ret/best --eval s3://bucket/corpora/x/test
"""

from __future__ import annotations

import sys

from mplug2.train.cli import main as train_main


def main(argv: list[str] | None = None) -> int:
    return train_main(["evaluate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
