"""Orchestration: the stage table, the pipeline, and the CLI generated from the configs."""
