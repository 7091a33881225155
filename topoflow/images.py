"""The container images topoflow runs in on a cluster: one per dependency tier (images/<tier>/),
all tagged with the package version, so code and image always match."""

from topoflow import __version__

TAG = __version__
SPARK = f"topoflow-spark:{TAG}"  # Spark 4 runtime + topoflow[spark]: ingest, prepare, generation
TRAIN = f"topoflow-train:{TAG}"  # TensorFlow (GPU) + topoflow[train]: training and evaluation
BASE = f"topoflow-base:{TAG}"  # topoflow[pipeline]: steps that only launch operator resources (and deploy)
SERVE = f"topoflow-serve:{TAG}"  # topoflow[serve]: `topoflow serve`, the InferenceService's custom predictor
UID = 10001  # the non-root user every image runs as (images/*/Dockerfile); pods ask for it
