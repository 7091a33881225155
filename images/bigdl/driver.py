"""SparkApplication entry point of topoflow-bigdl (mainApplicationFile local:///opt/topoflow/bigdl_driver.py):
spark-submit runs it with the image's Python 3.9; it becomes ``topoflow train --engine bigdl <arguments>``
(Python 3.11), whose BigDL worker inherits PYSPARK_GATEWAY_PORT/PYSPARK_GATEWAY_SECRET and so trains in this
driver's JVM, on the executors spark-submit was given. Nothing here starts Spark itself."""

import os
import sys

topoflow = os.environ.get("TOPOFLOW", "topoflow")
os.execvp(topoflow, [topoflow, "train", "--engine", "bigdl", *sys.argv[1:]])
