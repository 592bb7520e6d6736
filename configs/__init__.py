"""Run configs shipped with the package, so ``--config configs/<name>.yaml`` works from any directory, from the
wheel and in the container image (:func:`mplug2.paths.config_file`)."""
