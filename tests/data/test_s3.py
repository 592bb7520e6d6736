"""Reading shards from a real S3 server (SeaweedFS), resume included."""

from __future__ import annotations

from mplug2.data.loader import LoaderConfig, build_loader
from tests.data.shards_fixture import write_shards
from tests.data.test_loader import _tokenize


def test_loader_reads_from_seaweedfs_and_resumes(s3_bucket):
    shards = write_shards(f"{s3_bucket}/corpora/img/train", [6, 6, 6, 6], size=(16, 16))
    cfg = LoaderConfig(prefix=shards.prefix, corpus="img", batch_size=3, num_workers=2, streams_per_rank=2,
                       res=8, shuffle_buffer=4)
    loader = build_loader(cfg, tokenize=_tokenize)
    per_epoch = loader.steps_per_epoch
    keys, states = [], []
    for _ in range(per_epoch + 2):
        keys.append(next(loader)["keys"])
        states.append(loader.state_dict())
    loader.close()
    epoch0 = [k for b in keys[:per_epoch] for k in b]
    assert sorted(epoch0) == sorted(shards.all_keys)          # 24 samples, 8 batches of 3: nothing dropped
    resumed = build_loader(cfg, tokenize=_tokenize)
    resumed.load_state_dict(states[2])
    assert [next(resumed)["keys"] for _ in range(3)] == keys[3:6]
    resumed.close()
