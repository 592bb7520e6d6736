"""The failure taxonomy (data-contract §11): every bad sample is one reason code, never a crash."""

from __future__ import annotations

INVALID_INPUT = "invalid_input"
NOT_FOUND = "not_found"
DOWNLOAD_ERROR = "download_error"
TIMEOUT = "timeout"
TOO_LARGE = "too_large"
DECODE_ERROR = "decode_error"
TOO_SMALL = "too_small"
FILTERED = "filtered"
CLIP_OUT_OF_RANGE = "clip_out_of_range"
OPTED_OUT = "opted_out"
EMPTY_CAPTION = "empty_caption"
NOT_MEDIA = "not_media"  # the body is a web page / JSON / text, not an image or video (an HTML error page)
INTERNAL_ERROR = "internal_error"
LOW_SCORE = "low_score"  # below --min-score of the --score-with model stage

REASONS: tuple[str, ...] = (
    INVALID_INPUT, NOT_FOUND, DOWNLOAD_ERROR, TIMEOUT, TOO_LARGE, DECODE_ERROR, TOO_SMALL, FILTERED,
    CLIP_OUT_OF_RANGE, OPTED_OUT, EMPTY_CAPTION, NOT_MEDIA, INTERNAL_ERROR, LOW_SCORE,
)

# Reasons a `--retry-failed` pass fetches again.
RETRYABLE: frozenset[str] = frozenset({DOWNLOAD_ERROR, TIMEOUT, INTERNAL_ERROR})


class SampleError(Exception):
    """A per-sample failure with a reason code from :data:`REASONS` and a human message."""

    def __init__(self, reason: str, message: str):
        if reason not in REASONS:
            raise ValueError(f"unknown failure reason {reason!r}")
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message or reason

    def __reduce__(self):  # pickled between pipeline stages: rebuild from (reason, message), keep attributes
        return (type(self), (self.reason, self.message), self.__dict__)


class ConfigError(ValueError):
    """A start-up error (bad manifest schema, bad option): raised before anything is written."""


# Exit codes of ``mplug2-data shard`` (the summary is printed in every case).
EXIT_OK = 0
EXIT_TOO_MANY_FAILED = 1       # failed/attempted above --max-failure-ratio, or every row failed
EXIT_BAD_INVOCATION = 2        # bad flag, config, manifest schema, output, credentials (argparse also uses 2)
EXIT_STORAGE_UNAVAILABLE = 3   # storage kept failing past the retry deadline ($MPLUG2_S3_RETRY_DEADLINE_S)
EXIT_INCOMPLETE = 4            # shards failed for good, or the global watchdog ended the run


class PermanentShardError(RuntimeError):
    """A whole-shard failure that running the shard again cannot fix (a lost writer lease): the driver
    reports it at once instead of retrying. Any other exception from a shard task is retried."""


def shard_error_is_retryable(exc: BaseException) -> bool:
    """Whether the driver retries a shard whose task raised ``exc``: storage errors, a dead worker or a
    deadline may pass; a permanent error or a config error will not. Decided from the type (Ray re-raises a
    task's exception as a subclass of its cause, a process pool as the same type), never from its text."""
    return not isinstance(exc, (PermanentShardError, ConfigError))
