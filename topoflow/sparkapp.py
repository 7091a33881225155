"""Run a Spark stage (ingest, prepare, predict) on Kubernetes as a SparkApplication of the Kubeflow Spark operator.

On a cluster the pipeline pod does not run Spark itself: :func:`run_stage` creates a
``sparkoperator.k8s.io/v1beta2`` SparkApplication whose driver runs ``topoflow <stage>`` with the same
settings, waits for the operator to report the end, and deletes the application when the wait is
abandoned (time-out, Ctrl-C, SIGTERM) so that no unwatched Spark job keeps writing.

Operator states (kubeflow/spark-operator v2.5.2, ``api/v1beta2/sparkapplication_types.go``, reconciled in
``internal/controller/sparkapplication/controller.go``): "" (new) → SUBMITTED → RUNNING → SUCCEEDING or
FAILING → COMPLETED or FAILED, the only states the operator treats as final (``util.IsTerminated``). With
``restartPolicy: Never`` (set here) SUCCEEDING always ends COMPLETED, FAILING ends FAILED, and
SUBMISSION_FAILED turns into FAILED without a retry, so it ends the wait too. UNKNOWN, PENDING_RERUN,
INVALIDATING and the SUSPEND* states pass; the time-out bounds them.

When the application fails the operator only reports the driver's exit code, so the error the driver printed
is read from the tail of its pod's log and raised with the failure.
"""

from __future__ import annotations

import uuid

from topoflow import images, kube
from topoflow.config import Config, as_overrides
from topoflow.errors import ConfigError, TopoflowError

SPARK_APPLICATION = kube.Resource("sparkoperator.k8s.io", "v1beta2", "sparkapplications", "SparkApplication",
                                  "the Spark operator")
SPARK_STAGES = ("ingest", "prepare", "predict")
# The image runs topoflow's CLI through this two-line script: from topoflow.cli import main; raise SystemExit(main())
ENTRY = "local:///opt/topoflow/entry.py"
# Inside the cluster the driver reaches the API server here; a configured local[*] master would keep it alone.
IN_CLUSTER_MASTER = "k8s://https://kubernetes.default.svc"
# Fixed ports, so that k8s/'s NetworkPolicy between drivers and executors can name them.
SPARK_PORTS = {"spark.driver.port": "7078", "spark.driver.blockManager.port": "7079", "spark.blockManager.port": "7079"}
SPARK_VERSION = "4.3.0"  # the pyspark that pyproject's spark extra pins, i.e. the image's Spark
FAILURE_STATES = ("FAILED", "SUBMISSION_FAILED")
# Spark names the driver's container so (Constants.DEFAULT_DRIVER_CONTAINER_NAME; the operator's
# common.SparkDriverContainerName): naming it keeps the log read working when the pod has sidecars
DRIVER_CONTAINER = "spark-kubernetes-driver"
# BigDL training (train.engine bigdl): what the bigdl image (images/bigdl/Dockerfile) provides, all here so that a
# change of the image is one edit. Its Spark is BigDL-dllib 2.4's pyspark 3.1.3 in the image's Python 3.9; its entry
# file runs ``topoflow train --engine bigdl <arguments>``.
BIGDL_IMAGE = f"topoflow-bigdl:{images.TAG}"
BIGDL_ENTRY = "local:///opt/topoflow/bigdl_driver.py"
BIGDL_PYTHON = "/usr/local/bin/python3.9"
_BIGDL_LIB = "/usr/local/lib/python3.9/site-packages/bigdl/share"
BIGDL_JARS = (f"{_BIGDL_LIB}/dllib/lib/bigdl-dllib-spark_3.1.3-2.4.0-jar-with-dependencies.jar:"
              f"{_BIGDL_LIB}/core/lib/all-2.4.0-20230420.050641-1.jar")  # the image's $BIGDL_CLASSPATH
BIGDL_SPARK_VERSION = "3.1.3"
# The driver pod's memory beyond spark.driver.memory (its JVM heap): BigDL's driver also runs topoflow's Python 3.11
# TensorFlow process and a Python 3.9 one that holds the whole padded training set; Spark's default (10 % of the
# heap, at least 384 MiB) would get the pod killed for memory
BIGDL_DRIVER_OVERHEAD = "4g"
BIGDL_CONF = {"spark.driver.extraClassPath": BIGDL_JARS, "spark.executor.extraClassPath": BIGDL_JARS,
              "spark.pyspark.python": BIGDL_PYTHON, "spark.pyspark.driver.python": BIGDL_PYTHON,
              "spark.driver.memoryOverhead": BIGDL_DRIVER_OVERHEAD,
              # BigDL's own spark-bigdl.conf (init_spark_conf adds it locally; spark-submit does not): training
              # starts only when every executor is there, as BigDL places one model replica per executor
              "spark.scheduler.minRegisteredResourcesRatio": "1.0",
              "spark.scheduler.maxRegisteredResourcesWaitingTime": "3600s", "spark.speculation": "false",
              "spark.shuffle.reduceLocality.enabled": "false", "spark.shuffle.blockTransferService": "nio",
              "spark.serializer": "org.apache.spark.serializer.JavaSerializer"}
SCRATCH = "/tmp"  # the driver's writable volume: BigDL's checkpoints without pipeline.pvc


def run_stage(stage: str, cfg: Config, *, namespace: str, image: str, service_account: str = "topoflow-spark",
              secret: str | None = "topoflow-s3", run_id: str | None = None, timeout_s: float | None = None,
              poll_s: float = 5.0, log=print, api=None) -> dict:
    """Run ``topoflow <stage>`` as a SparkApplication in ``namespace`` and wait for it to end.

    ``secret`` names the Kubernetes Secret whose keys (``kube.SECRET_KEYS``) reach the driver and executors as
    the AWS_* variables (the config's own keys are never copied into the object). ``run_id`` labels the
    application (e.g. the Kubeflow run's id). ``api`` is a ``kubernetes.client.ApiClient`` (default: the
    in-cluster service account, else the kubeconfig). Returns the final ``.status``; raises TopoflowError
    when the application fails or the time-out passes.
    """
    from kubernetes import client

    suffix = uuid.uuid4().hex[:8]
    name = f"topoflow-{stage}-{suffix}"
    body = spark_application(stage, cfg, name=name, namespace=namespace, image=image,
                             service_account=service_account, secret=secret, run_id=run_id or suffix)
    crd = client.CustomObjectsApi(api or kube.default_client())
    with kube.sigterm_interrupts():
        kube.call(crd, SPARK_APPLICATION, "create", namespace, crd.create_namespaced_custom_object, body=body)
        log(f"created SparkApplication {namespace}/{name}; driver log: kubectl logs -n {namespace} -f {name}-driver")
        try:
            status = _wait(crd, namespace, name, timeout_s, poll_s, log)
        except BaseException:  # time-out, Ctrl-C, SIGTERM, API error: nobody would watch the job any more
            kube.delete(crd, SPARK_APPLICATION, namespace, name, log)
            raise
    state = status["applicationState"]["state"]
    if state != "COMPLETED":
        driver = status.get("driverInfo", {}).get("podName") or f"{name}-driver"
        message = status["applicationState"].get("errorMessage") or "the operator gave no error message"
        said = kube.pod_error(crd.api_client, namespace, driver, DRIVER_CONTAINER, "the driver")
        raise TopoflowError(f"Spark {stage} failed: SparkApplication {namespace}/{name} is {state}: {message}\n"
                            + (f"{said}\n" if said else "")
                            + f"the driver's whole log: kubectl logs -n {namespace} {driver}")
    return status


def spark_application(stage: str, cfg: Config, *, name: str, namespace: str, image: str, service_account: str,
                      secret: str | None, run_id: str | None = None) -> dict:
    """The SparkApplication running ``topoflow <stage>`` with ``cfg``'s settings, sized by ``cfg.spark``. Stage
    ``train`` is BigDL training (``train.engine`` bigdl) in the bigdl image: its Spark, its Python, BigDL's jars,
    ``train.workers`` executors, checkpoints on ``pipeline.pvc`` when there is one (a rerun continues them), its
    data and export remote or on that volume (the driver reads and writes them)."""
    bigdl = stage == "train"
    if bigdl and cfg.train.engine != "bigdl":
        raise ConfigError(f"train.engine is {cfg.train.engine!r}: only the bigdl engine trains on Spark")
    if stage not in (*SPARK_STAGES, "train"):
        raise ConfigError(f"stage {stage!r} does not run on Spark; use one of {list(SPARK_STAGES)}")
    if bigdl:
        kube.require_shared(cfg, "the driver's pod")
    labels = {"app.kubernetes.io/name": "topoflow", "app.kubernetes.io/component": stage,
              "app.kubernetes.io/part-of": "topoflow", **({"topoflow/run-id": run_id} if run_id else {})}
    pod_security, container_security = kube.security_contexts(images.UID)
    mounts, volumes = [{"name": "tmp", "mountPath": "/tmp"}], [{"name": "tmp", "emptyDir": {"sizeLimit": "4Gi"}}]
    pc = cfg.pipeline
    if bigdl and pc.pvc:
        mounts.append({"name": "data", "mountPath": pc.pvc_mount})
        volumes.append({"name": "data", "persistentVolumeClaim": {"claimName": pc.pvc}})
    pod = {
        "labels": labels,
        "env": kube.secret_env(secret),
        "podSecurityContext": pod_security,
        "securityContext": container_security,
        "volumeMounts": mounts,
    }
    sc = cfg.spark
    executor = {"cores": 1, "instances": 2, "memory": "4g"}  # where cfg.spark leaves them to Spark
    executor.update({k: v for k, v in (("cores", sc.executor_cores), ("instances", sc.executor_instances),
                                       ("memory", sc.executor_memory)) if v is not None})
    executor["coreRequest"] = executor["coreLimit"] = str(executor["cores"])  # Spark sets the memory limit itself
    settings = ["--no-progress", *_settings(cfg)]
    if bigdl:  # the entry file runs `topoflow train --engine bigdl`: no stage in the arguments
        executor["instances"] = cfg.train.workers
        arguments = [*settings, "--resume", "auto", "--set", f"train.checkpoint_dir={kube.checkpoint_dir(cfg, SCRATCH)}"]
    else:
        arguments = [stage, *settings]
    return {
        "apiVersion": SPARK_APPLICATION.api_version,
        "kind": SPARK_APPLICATION.kind,
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "type": "Python",
            "pythonVersion": "3",
            "mode": "cluster",
            "image": image,
            "sparkVersion": BIGDL_SPARK_VERSION if bigdl else SPARK_VERSION,
            "mainApplicationFile": BIGDL_ENTRY if bigdl else ENTRY,
            "arguments": arguments,
            "sparkConf": {**SPARK_PORTS, **(BIGDL_CONF if bigdl else {}), **sc.conf},
            "volumes": volumes,  # the root filesystem is read-only
            "restartPolicy": {"type": "Never"},  # a rerun would repeat a stage that already failed on its input
            "timeToLiveSeconds": 24 * 3600,  # keeps a failed run's driver log a day, then the operator tidies up
            "driver": {**pod, "cores": 1, "coreRequest": "1", "coreLimit": "1", "memory": sc.driver_memory,
                       "serviceAccount": service_account},
            "executor": {**pod, **executor},
        },
    }


def _settings(cfg: Config) -> list[str]:
    """``--set section.key=<json>`` for each setting that differs from its default, secrets left out (the
    driver reads them from the Secret's environment), the pipeline section left out (it concerns this launcher)
    and the master pointed at the cluster."""
    data = cfg.public_dump(exclude_defaults=True, exclude={"pipeline": True})
    data.setdefault("spark", {})["master"] = IN_CLUSTER_MASTER
    return [arg for setting in as_overrides(data) for arg in ("--set", setting)]


def _wait(crd, namespace: str, name: str, timeout_s: float | None, poll_s: float, log) -> dict:
    """Poll until a final state, logging each change; the final ``.status``."""
    def state(obj: dict) -> str:
        return (obj.get("status") or {}).get("applicationState", {}).get("state", "") or "NEW"

    try:
        obj = kube.wait(lambda: kube.call(crd, SPARK_APPLICATION, "get", namespace, crd.get_namespaced_custom_object,
                                          name=name),
                        lambda obj: f"SparkApplication {namespace}/{name}: {state(obj)}",
                        lambda obj: state(obj) == "COMPLETED" or state(obj) in FAILURE_STATES, timeout_s, poll_s, log)
    except kube.TimedOut as e:
        raise TopoflowError(f"SparkApplication {namespace}/{name} still {state(e.last)} after {timeout_s:g} s; "
                            "deleting it\nallow more time (timeout_s) or give Spark more executors (spark.*)") from None
    return obj["status"]

