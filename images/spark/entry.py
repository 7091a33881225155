"""SparkApplication entry point (mainApplicationFile local:///opt/topoflow/entry.py): runs
``python -m topoflow.cli`` with the application's arguments, e.g. ``ingest --config …``."""

import runpy

runpy.run_module("topoflow.cli", run_name="__main__", alter_sys=True)
