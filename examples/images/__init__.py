"""The image-upload workflow: `rulework run examples/images/workflow.py:ingest`."""
