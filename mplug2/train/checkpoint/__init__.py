"""The checkpoint format: per-rank files, a per-rank ``done`` marker, and ``manifest.json`` written last.

Layout of one checkpoint folder (local or ``s3://``; ``training-and-ops.md`` §1.4)::

    model.safetensors        rank 0   model weights (momentum copies included: they are parameters/buffers)
    trainer_state.pt         rank 0   optimizer, LR scheduler, ``extra`` (queues, GradScaler, step counters)
    rng_rank{r}.pt           rank r   python, numpy, torch CPU and CUDA RNG states
    data_rank{r}.json        rank r   the data cursor (``MixedLoader``/``CorpusLoader.state_dict()``)
    done_rank{r}.json        rank r   LAST per rank: names and sizes of the files this rank wrote
    manifest.json            rank 0   LAST overall: step, world size, config hash, code and library versions

Under FSDP2 (``scale.strategy: fsdp2``) the model and optimizer are a torch DCP checkpoint instead
(:mod:`.dcp`), and ``trainer_state.pt`` then holds no optimizer.

The modules, one concept each: :mod:`.layout` (names, version, provenance), :mod:`.snapshot` (the state
copied on the training thread and serialised later), :mod:`.staging` (the buffers it is copied into),
:mod:`.commit` (payload, markers, manifest last; what makes a folder valid), :mod:`.retention` (a run's
checkpoints: the newest valid, the ``keep_last`` kept), :mod:`.load` (restore), :mod:`.dcp` (FSDP2).
Pure torch + storage (no Ray).
"""

from mplug2.train.checkpoint.commit import checkpoint_problems, commit_checkpoint, upload_checkpoint, \
    validate_checkpoint
from mplug2.train.checkpoint.layout import (
    DCP_METADATA, FORMAT_VERSION, MANIFEST_FILE, MODEL_FILE, STEP_PREFIX, TRAINER_FILE, CheckpointError,
    code_version, config_hash, data_file, done_file, rng_file,
)
from mplug2.train.checkpoint.load import LoadedCheckpoint, load_checkpoint, read_model_tensors
from mplug2.train.checkpoint.retention import find_latest_valid, list_step_checkpoints, prune_checkpoints
from mplug2.train.checkpoint.snapshot import Snapshot, rng_state, save_checkpoint, set_rng_state, take_snapshot
from mplug2.train.checkpoint.staging import StagingBuffers

__all__ = [
    "FORMAT_VERSION", "MODEL_FILE", "TRAINER_FILE", "MANIFEST_FILE", "DCP_METADATA", "STEP_PREFIX",
    "CheckpointError", "LoadedCheckpoint", "Snapshot", "StagingBuffers", "checkpoint_problems", "code_version",
    "commit_checkpoint", "config_hash", "data_file", "done_file", "find_latest_valid", "list_step_checkpoints",
    "load_checkpoint", "prune_checkpoints", "read_model_tensors", "rng_file", "rng_state", "save_checkpoint",
    "set_rng_state", "take_snapshot", "upload_checkpoint", "validate_checkpoint",
]
