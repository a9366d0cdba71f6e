"""The pipeline's stages: one module per DVC stage, each `python -m stages.<name>`, its params section and MLflow run
of the same name. The logic they wire together lives in `dapt/`."""
