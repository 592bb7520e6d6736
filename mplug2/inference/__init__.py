"""Apply a model folder to one's own media: frames in through the pipeline's own code, captions, answers and
ITC embeddings out. Pure torch (no Ray): the batch-inference job and ``mplug2-model`` both call this package."""

from mplug2.inference.media import Media, MediaError, MediaLoader, MediaOptions
from mplug2.inference.predictor import Predictor

__all__ = ["Media", "MediaError", "MediaLoader", "MediaOptions", "Predictor"]
