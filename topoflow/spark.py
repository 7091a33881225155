"""The one place a Spark session is made: local mode by default, every setting overridable."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import sys
import threading
from pathlib import Path

from topoflow.config import SparkConfig
from topoflow.errors import BadInputError, ConfigError, StorageError, TopoflowError
from topoflow.extras import require

log = logging.getLogger(__name__)

# Our own progress bars replace Spark's console bar; the UI costs start-up time in local runs.
_DEFAULTS = {
    "spark.ui.showConsoleProgress": "false",
    "spark.sql.execution.pyspark.python": sys.executable,
    "spark.python.worker.reuse": "true",
    "spark.driver.extraJavaOptions": f"-Dlog4j2.configurationFile={Path(__file__).with_name('log4j2.properties')}",
}


def session(cfg: SparkConfig):
    """Create (or reuse) the session for ``cfg`` with topoflow's data sources registered.

    Workers must run this same Python (``PYSPARK_PYTHON``), or they miss the installed packages;
    a local master binds to loopback (``SPARK_LOCAL_IP``) so that a laptop's changing network does
    not break it. Both are left alone when already set.
    """
    SparkSession = require("pyspark.sql", "spark").SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    local = cfg.master.startswith("local")
    if local:
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    builder = SparkSession.builder.master(cfg.master).appName(cfg.app_name)
    settings = dict(_DEFAULTS)
    if local:
        settings["spark.ui.enabled"] = "false"
    settings.update(cfg.settings())
    for key, value in settings.items():
        builder = builder.config(key, value)
    spark = _keeping_sigint(builder.getOrCreate)
    spark.sparkContext.setLogLevel("ERROR")
    from topoflow.datasource import register

    register(spark)
    log.info("Spark %s, master %s", spark.version, cfg.master)
    return spark


def _keeping_sigint(create):
    """Call ``create`` but keep the SIGINT handler: PySpark's own cancels jobs *inside* the signal
    handler, re-entering the py4j call in progress, and prints tracebacks over a plain Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        return create()
    previous = signal.getsignal(signal.SIGINT)
    try:
        return create()
    finally:
        signal.signal(signal.SIGINT, previous)


def stop_active() -> None:
    """After Ctrl-C or SIGTERM: cancel this process's Spark jobs and stop its session, so that the
    JVM (still running the interrupted job) does not outlive the command."""
    from pyspark import SparkContext

    sc = SparkContext._active_spark_context
    if sc is not None:
        with contextlib.suppress(Exception):
            sc.cancelAllJobs()
            sc.stop()


_REMOTE_ERROR = re.compile(r"topoflow\.errors\.(\w+): (.*?)(?:\n\s*\n|\n\tat |\Z)", re.S)


def job_error(e: Exception) -> Exception:
    """Recover our own error from a failed Spark job: it arrives as text inside a Java exception. A
    BadInputError keeps its file, problem and fix, parsed back from its text: the problem, a line
    ``in file URL``, the fix (the last such line counts: a problem may quote a library's own)."""
    found = _REMOTE_ERROR.findall(str(e))
    if not found:
        return e
    kind, text = found[-1]
    text = text.strip()
    problem, in_file, rest = text.rpartition("\nin file ")
    if kind == "BadInputError" and in_file:
        url, _, fix = rest.partition("\n")
        return BadInputError(url, problem, fix)
    return {"StorageError": StorageError, "ConfigError": ConfigError}.get(kind, TopoflowError)(text)
