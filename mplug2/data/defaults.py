"""Loader defaults: the one place both :class:`mplug2.data.loader.LoaderConfig` and a training run's ``data:``
section (:class:`mplug2.train.config.DataConfig`) take them from. Light on purpose (no torch import), so the
training config can read it.
"""

from __future__ import annotations

SHUFFLE_BUFFER = 1000        # samples per stream's shuffle buffer
SHARDS_IN_FLIGHT = 4         # shards interleaved per stream
MAX_TEXT_LEN = 30            # tokens per caption (the release's max_words is 30 too)
AUGMENT = True               # RandAugment on top of crop + flip in training
CROP_SCALE = (0.5, 1.0)      # area range of the training random-resized crop (ALBEF / BLIP)
AUGMENT_ON = "cpu"           # cpu: loader workers finish the pixels; device: the training device does
AUGMENT_ON_CHOICES = ("cpu", "device")
PREFETCH_FACTOR = 2          # batches each DataLoader worker keeps ready
MAX_BAD_SAMPLES = 10_000     # damaged samples skipped before the run fails (None: no limit)
MAX_BAD_FRACTION = 1.0       # ... or this fraction of the samples asked for (mplug2.data.damage)
READ_ATTEMPTS = 5            # per shard read, with exponential backoff
