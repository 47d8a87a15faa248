"""Not code: this file makes ds_configs/ the package `gptscale._ds_configs`, so that the
DeepSpeed templates ship inside an installed gptscale (pyproject.toml maps the folder into
the package; gptscale.ds_templates reads it through importlib.resources). Edit the JSON here."""
