"""Model-shape configs (presets as YAML), shipped with the package."""
