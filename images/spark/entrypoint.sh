#!/bin/bash
# Entry point of topoflow-spark and topoflow-bigdl. The Spark operator starts driver pods as `driver
# <spark-submit arguments>` and executor pods as `executor` (settings in SPARK_* variables); anything else
# runs as given, e.g. `topoflow ingest --config /etc/topoflow/config.yaml` with a local master.
# SPARK_EXECUTOR_BACKEND names the executor class: Spark 4's Kubernetes backend (default), or Spark 3.1's
# CoarseGrainedExecutorBackend in the bigdl image (BigDL's Spark), which takes no --podName.
set -euo pipefail

case "${1:-}" in
  driver)
    shift
    # inside the driver pod, the application runs in client mode against the API server
    exec tini -s -- spark-submit --deploy-mode client \
      --conf "spark.driver.bindAddress=${SPARK_DRIVER_BIND_ADDRESS}" "$@"
    ;;
  executor)
    shift
    # JVM options arrive as SPARK_JAVA_OPT_0, SPARK_JAVA_OPT_1, ... in that order
    mapfile -t java_opts < <(env | grep '^SPARK_JAVA_OPT_' | sort -t_ -k4 -n | sed 's/^[^=]*=//')
    classpath="${SPARK_CONF_DIR:-${SPARK_HOME}/conf}:${SPARK_HOME}/jars/*${SPARK_CLASSPATH:+:${SPARK_CLASSPATH}}"
    backend="${SPARK_EXECUTOR_BACKEND:-org.apache.spark.scheduler.cluster.k8s.KubernetesExecutorBackend}"
    pod=()
    [[ "${backend}" == *KubernetesExecutorBackend ]] && pod=(--podName "${SPARK_EXECUTOR_POD_NAME}")
    exec tini -s -- java "${java_opts[@]}" \
      "-Xms${SPARK_EXECUTOR_MEMORY}" "-Xmx${SPARK_EXECUTOR_MEMORY}" -cp "${classpath}" "${backend}" \
      --driver-url "${SPARK_DRIVER_URL}" --executor-id "${SPARK_EXECUTOR_ID}" \
      --cores "${SPARK_EXECUTOR_CORES}" --app-id "${SPARK_APPLICATION_ID}" \
      --hostname "${SPARK_EXECUTOR_POD_IP}" --resourceProfileId "${SPARK_RESOURCE_PROFILE_ID}" "${pod[@]}"
    ;;
  *)
    exec tini -s -- "$@"
    ;;
esac
