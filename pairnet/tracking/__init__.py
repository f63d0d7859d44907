"""MLflow integration: tracking server, run lifecycle, callback, model flavour, registry."""
