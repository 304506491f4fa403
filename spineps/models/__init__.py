"""Model folders: the self-describing ``inference_config.json`` contract and where models
come from (bundled, environment variable, command-line flag)."""
