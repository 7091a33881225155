#!/bin/bash
# Entry point of topoflow-bigdl: images/spark/entrypoint.sh for Spark 3.1 (BigDL's Spark), whose executor
# class is CoarseGrainedExecutorBackend. The Spark operator starts driver pods as `driver <spark-submit
# arguments>` and executor pods as `executor`; anything else runs as given (`topoflow train ...`).
set -euo pipefail

case "${1:-}" in
  driver)
    shift
    exec tini -s -- spark-submit --deploy-mode client \
      --conf "spark.driver.bindAddress=${SPARK_DRIVER_BIND_ADDRESS}" "$@"
    ;;
  executor)
    shift
    mapfile -t java_opts < <(env | grep '^SPARK_JAVA_OPT_' | sort -t_ -k4 -n | sed 's/^[^=]*=//')
    classpath="${SPARK_CONF_DIR:-${SPARK_HOME}/conf}:${SPARK_HOME}/jars/*${SPARK_CLASSPATH:+:${SPARK_CLASSPATH}}"
    exec tini -s -- java "${java_opts[@]}" \
      "-Xms${SPARK_EXECUTOR_MEMORY}" "-Xmx${SPARK_EXECUTOR_MEMORY}" -cp "${classpath}" \
      org.apache.spark.executor.CoarseGrainedExecutorBackend \
      --driver-url "${SPARK_DRIVER_URL}" --executor-id "${SPARK_EXECUTOR_ID}" \
      --cores "${SPARK_EXECUTOR_CORES}" --app-id "${SPARK_APPLICATION_ID}" \
      --hostname "${SPARK_EXECUTOR_POD_IP}" --resourceProfileId "${SPARK_RESOURCE_PROFILE_ID}"
    ;;
  *)
    exec tini -s -- "$@"
    ;;
esac
