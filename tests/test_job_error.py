"""An error raised inside a Spark task reaches the driver as text inside a Java exception;
``spark.job_error`` turns it back into the same topoflow error, a bad file keeping its URL and fix."""

from __future__ import annotations

import pytest

from topoflow.errors import BadInputError, StorageError
from topoflow.spark import job_error


def _failed_job(spark, error: Exception) -> Exception:
    def fail(_):  # nested, so that Spark ships it by value to its Python workers
        raise error

    with pytest.raises(Exception) as e:
        spark.sparkContext.parallelize([0], 1).map(fail).collect()
    return job_error(e.value)


@pytest.mark.spark
@pytest.mark.parametrize("problem, fix", [
    ("cannot read the file: not a ROOT file\nin file /tmp/inner.root", "re-copy it, or use --on-bad-file skip"),
    ("non-finite value in branch 'Jet.PT' at entry 7", ""),
], ids=["quoting-in-file", "no-fix"])
def test_bad_input_inside_a_task_keeps_file_problem_and_fix(spark, problem, fix):
    url = "root://eos.example:1094//store/ttbar/file 01.root"
    error = _failed_job(spark, BadInputError(url, problem, fix))
    assert type(error) is BadInputError and (error.url, error.problem, error.fix) == (url, problem, fix)


@pytest.mark.spark
def test_storage_error_inside_a_task_stays_a_storage_error(spark):
    error = _failed_job(spark, StorageError("access denied to s3://bucket/ingested: check the keys"))
    assert type(error) is StorageError and str(error) == "access denied to s3://bucket/ingested: check the keys"
