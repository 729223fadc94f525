"""Registry: MLflow runs, lineage, model versions, aliases and the pyfunc model."""
