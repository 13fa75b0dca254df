"""The software-build workflow: `rulework run examples/build/workflow.py:test`."""
