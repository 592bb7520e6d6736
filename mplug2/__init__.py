"""mPLUG-2 on Ray: the model (``mplug2.models``), its objectives and task heads, data loading and training.

The model packages (``config``, ``models``, ``objectives``, ``tasks``, ``tokenizer``, ``weights``) are plain
PyTorch and never import Ray; Ray lives at the edges (``mplug2.train.trainer``, ``pipelines``, ``jobs``).
"""

__version__ = "0.1.0"
