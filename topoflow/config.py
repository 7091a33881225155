"""The one typed configuration model: YAML file, then command-line overrides, then validation.

Every entry point (CLI, Kubeflow components, tests) builds a :class:`Config` here, so no setting is
defined twice. Loading has no side effects: nothing is read from the environment at import time.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from topoflow import CLASSES
from topoflow.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SparkConfig(_Section):
    """Where Spark runs. Local mode by default; set ``master`` to ``k8s://https://…`` for Kubernetes."""

    master: str = "local[*]"
    app_name: str = "topoflow"
    driver_memory: str = "4g"
    executor_memory: str | None = None
    executor_cores: int | None = None
    executor_instances: int | None = None
    conf: dict[str, str] = Field(default_factory=dict, description="any other spark.* setting")

    def settings(self) -> dict[str, str]:
        """All settings as Spark configuration keys (``conf`` wins over the named fields)."""
        named = {
            "spark.driver.memory": self.driver_memory,
            "spark.executor.memory": self.executor_memory,
            "spark.executor.cores": self.executor_cores,
            "spark.executor.instances": self.executor_instances,
        }
        out = {k: str(v) for k, v in named.items() if v is not None}
        out.update(self.conf)
        return out


class StorageConfig(_Section):
    """How to reach remote storage. S3 settings fall back to the standard AWS environment variables."""

    s3_endpoint_url: str | None = Field(None, description="e.g. http://127.0.0.1:8333 (else AWS_ENDPOINT_URL)")
    s3_access_key_id: SecretStr | None = Field(None, description="else AWS_ACCESS_KEY_ID")
    s3_secret_access_key: SecretStr | None = Field(None, description="else AWS_SECRET_ACCESS_KEY")
    s3_region: str | None = None
    timeout_s: int = Field(30, ge=1, description="connect/read time-out for XRootD and S3 operations")
    retries: int = Field(2, ge=0, description="retries of a failed network operation")
    overwrite: bool = Field(False, description="let a stage replace an output folder that is not an earlier "
                            "output of that stage (never one holding its inputs or the working directory)")

    _ENV: ClassVar[dict[str, tuple[str, ...]]] = {  # where an unset setting comes from, first found wins
        "s3_endpoint_url": ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
        "s3_access_key_id": ("AWS_ACCESS_KEY_ID",),
        "s3_secret_access_key": ("AWS_SECRET_ACCESS_KEY",),
    }

    def env_source(self, name: str) -> str | None:
        """The environment variable that supplies setting ``name``, because the config leaves it unset."""
        if getattr(self, name):
            return None
        return next((var for var in self._ENV.get(name, ()) if os.environ.get(var)), None)

    def _resolved(self, name: str) -> str | None:
        if var := self.env_source(name):
            return os.environ[var]
        value = getattr(self, name)
        return value.get_secret_value() if isinstance(value, SecretStr) else value

    def s3_options(self) -> dict[str, Any]:
        """fsspec/s3fs keyword arguments; secrets are resolved here, never stored elsewhere."""
        key, secret, endpoint = map(self._resolved, ("s3_access_key_id", "s3_secret_access_key", "s3_endpoint_url"))
        opts: dict[str, Any] = {
            "config_kwargs": {
                "connect_timeout": self.timeout_s,
                "read_timeout": self.timeout_s,
                "retries": {"max_attempts": self.retries + 1, "mode": "standard"},
            },
            "skip_instance_cache": True,
        }
        if key and secret:
            opts.update(key=key, secret=secret)
        if endpoint:
            opts["endpoint_url"] = endpoint
        if self.s3_region:
            opts["client_kwargs"] = {"region_name": self.s3_region}
        return opts


class IngestConfig(_Section):
    """What ``topoflow ingest`` reads and writes."""

    datasets: dict[str, list[str]] = Field(
        default_factory=dict,
        description="class name (qcd, ttbar, wjets) -> list of URLs or globs of Delphes ROOT files",
    )
    output: str = Field("out/ingested", description="URL of the Parquet dataset to write")
    on_bad_file: Literal["fail", "skip"] = Field(
        "fail", description="fail: stop before writing anything; skip: leave the file out and list it"
    )
    muon_collection: Literal["auto", "Muon", "MuonTight"] = Field(
        "auto", description="auto: MuonTight where the file has it (original card), else Muon"
    )
    entries_per_partition: int = Field(20_000, ge=1, description="largest entry range one Spark task reads")
    batch_size: int = Field(2_000, ge=1, description="events computed together in one vectorised batch")
    row_group_size: int = Field(1_000, ge=1, description="events per Parquet row group (bounds reader memory)")

    @field_validator("datasets")
    @classmethod
    def _known_classes(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        unknown = sorted(set(value) - set(CLASSES))
        if unknown:
            raise ValueError(f"unknown class name(s) {unknown}; use {list(CLASSES)}")
        return value


class GenerateConfig(_Section):
    """What ``topoflow generate`` simulates (Pythia 8 + topoflow's fast detector simulation)."""

    output: str = Field("out/generated", description="URL of the folder of Delphes-format ROOT files")
    events: dict[str, int] = Field(default_factory=lambda: {"qcd": 2000, "ttbar": 2000, "wjets": 2000},
                                   description="events passing the generator lepton filter, per class")
    events_per_file: int = Field(500, ge=1, description="one file (and one Pythia seed) per this many events")
    seed: int = Field(1, description="base seed: each file's seed derives from it, the class and the file number")
    workers: int | None = Field(None, ge=1, description="parallel processes (default: all cores)")
    qcd_fake_fraction: float = Field(0.5, ge=0, le=1, description="share of QCD events whose lepton is a "
                                     "jet faking an electron or a muon (the rest: semileptonic heavy-flavour decays)")
    reference: str = Field("../shared/data/delphes", description="real Delphes files <class>_*.root for --validate")
    validation_dir: str = Field("out/validation", description="local folder for the validation plots")

    @field_validator("events")
    @classmethod
    def _known_classes(cls, value: dict[str, int]) -> dict[str, int]:
        unknown = sorted(set(value) - set(CLASSES))
        if unknown:
            raise ValueError(f"unknown class name(s) {unknown}; use {list(CLASSES)}")
        return value


class PrepareConfig(_Section):
    """What ``topoflow prepare`` reads and writes."""

    input: str = Field("out/ingested", description="URL of an ingested dataset (or, with from_original, "
                       "of Parquet in the original CERN schema)")
    output: str = Field("out/prepared", description="URL of the training/test datasets to write")
    from_original: bool = Field(False, description="input has HLF_input, GRU_input (801×19 padded), encoded_label")
    seed: int = Field(42, description="seeds balancing, the split and the shuffle")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="share of events held out for evaluate")
    validation_fraction: float = Field(0.1, gt=0, lt=1, description="share of the non-test events held out "
                                       "to validate each training epoch (and to tune on)")
    balance: bool = Field(True, description="undersample every class to the smallest one")
    row_group_size: int = Field(1_000, ge=1, description="events per Parquet row group (bounds reader memory)")


class TrainConfig(_Section):
    """What ``topoflow train`` trains (the sizes are the knobs tuning turns)."""

    data: str = Field("out/prepared", description="URL of a prepared dataset (train/, test/, preprocessing.json)")
    model: Literal["hlf", "gru", "inclusive"] = Field("inclusive", description="which classifier of SPEC.md")
    output: str = Field("out/models/{model}", description="URL of the exported model folder")
    checkpoint_dir: str = Field("out/checkpoints/{model}", description="local folder for checkpoints and logs")
    gru_units: int = Field(50, ge=1)
    hlf_units: list[int] = Field(default_factory=lambda: [50, 20, 10], description="hidden layers of the HLF model")
    dense_units: int = Field(25, ge=1, description="the inclusive model's dense layer")
    dropout: float = Field(0.2, ge=0, lt=1)
    learning_rate: float = Field(3e-3, gt=0, description="Adam's initial learning rate")
    lr_schedule: Literal["cosine", "constant"] = Field(
        "cosine", description="cosine: decay to 5 % of learning_rate over all epochs (settles the last epochs); "
        "constant: the original's fixed rate")
    batch_size: int = Field(128, ge=1)
    epochs: int = Field(6, ge=1)
    steps_per_epoch: int | None = Field(None, ge=1, description="cap on batches per epoch (quick runs)")
    bucket: bool = Field(False, description="group sequences of similar length into batches")
    mixed_precision: bool = Field(False, description="float16 compute on GPU")
    threads: int | None = Field(None, ge=1, description="CPU threads TensorFlow uses (None: every core it sees; "
                                "set it to a pod's CPU limit)")
    seed: int = 42
    engine: Literal["keras", "multiworker", "bigdl"] = Field(
        "keras", description="keras: one process, CPU or GPU(s); multiworker: TensorFlow MultiWorkerMirroredStrategy "
        "over `workers` processes (locally) or TFJob workers; bigdl: BigDL on Spark, in its own Python 3.9 "
        "environment (make bigdl-env)")
    workers: int = Field(2, ge=1, description="multiworker: worker processes (a TFJob's replicas on Kubernetes); "
                         "bigdl: Spark cores locally, executors on Kubernetes. batch_size stays the global batch, "
                         "so the same settings train the same model on any number of workers")
    bigdl_python: str | None = Field(None, description="Python of the BigDL environment (default: the project's "
                                     ".venv-bigdl, else topoflow-bigdl-python on PATH)")

    def resolved(self, text: str) -> str:
        return text.format(model=self.model)

    def result_settings(self) -> dict:
        """The settings that decide what training computes (not where it writes, nor how many threads it uses):
        what a resumed run shares with its checkpoint, and a continued study with the run that started it."""
        return self.model_dump(mode="json", exclude={"output", "checkpoint_dir", "threads", "workers", "bigdl_python"})


# what a trial may not change: they name the study's model and where a trial writes
_NOT_TUNABLE = ("model", "output", "checkpoint_dir", "engine", "workers", "bigdl_python")
METRICS = ("loss", "accuracy", "auc", "val_loss", "val_accuracy", "val_auc")  # what training reports per epoch


class Parameter(_Section):
    """One dimension of the search space: a range (``low``, ``high``; ``log`` scale; ``step`` for a grid)
    or a list of ``choices``. ``type`` follows from the train setting it tunes when not given."""

    type: Literal["float", "int", "categorical"] | None = None
    low: float | None = None
    high: float | None = None
    scale: Literal["linear", "log"] = "linear"
    step: float | None = Field(None, gt=0, description="grid spacing (needed by the grid algorithm)")
    choices: list[Any] | None = None

    def values(self) -> list[Any]:
        """The grid points (or choices) of this parameter."""
        if self.choices is not None:
            return list(self.choices)
        count = int(round((self.high - self.low) / self.step)) + 1
        points = [self.low + i * self.step for i in range(count) if self.low + i * self.step <= self.high * (1 + 1e-12)]
        return [int(round(v)) if self.type == "int" else round(v, 12) for v in points]


class EarlyStopping(_Section):
    """Median stopping, Katib's medianstop rule: once ``min_trials`` trials have completed, a trial reaching
    epoch ``start_epoch`` stops there when its best objective so far is worse than the mean, over the completed
    trials, of each one's average over its first ``start_epoch`` epochs."""

    enabled: bool = True
    min_trials: int = Field(3, ge=1, description="completed trials needed before any trial is stopped")
    start_epoch: int = Field(2, ge=1, description="the epoch at which a trial may be stopped")


class Objective(_Section):
    metric: Literal[METRICS] = Field("val_auc", description="a metric training reports per epoch (val_*: the "
                                     "validation split; the test split is never used for tuning)")
    direction: Literal["maximize", "minimize"] | None = Field(None, description="default: minimize a loss, "
                                                              "maximize the others")

    @property
    def goal(self) -> str:
        return self.direction or ("minimize" if self.metric.endswith("loss") else "maximize")


class TuneConfig(_Section):
    """What ``topoflow tune`` searches: train.* settings (``parameters``), for the model ``train.model``,
    on ``train.data``. A search-space file (``--space``) holds this section."""

    enabled: bool = Field(False, description="the pipeline tunes each model before training it")
    name: str = Field("{model}", pattern=r"^[a-z{]([-a-z0-9{}]*[a-z0-9}])?$",
                      description="study name (Katib Experiment name: a letter first); the same name continues a study")
    output: str = Field("out/tuning/{name}", description="URL of the study: its journal, trials.parquet, "
                        "trials.json, trials.png and best.yaml")
    backend: Literal["spark", "katib"] = Field("spark", description="spark: trials as Spark tasks (locally one "
                                               "per core); katib: a Katib Experiment on Kubernetes")
    parameters: dict[str, Parameter] = Field(
        default_factory=lambda: {"learning_rate": Parameter(low=3e-4, high=3e-2, scale="log"),
                                 "batch_size": Parameter(choices=[64, 128, 256])},
        validate_default=True, description="train setting -> range or choices")
    objective: Objective = Field(default_factory=Objective)
    algorithm: Literal["random", "grid", "tpe"] = "tpe"
    trials: int = Field(12, ge=1, description="trials to finish (completed, stopped or failed), resumes included")
    parallelism: int = Field(2, ge=1, description="trials running at once")
    max_failed: int = Field(3, ge=1, description="the study stops when more trials than this have failed")
    timeout_s: int | None = Field(None, ge=1, description="no trial starts after this long")
    early_stopping: EarlyStopping = Field(default_factory=EarlyStopping)
    seed: int = Field(0, description="seed of the algorithm's proposals (trials train with train.seed)")

    def resolved(self, text: str, model: str) -> str:
        return text.format(name=self.name.format(model=model), model=model)

    @model_validator(mode="after")
    def _known_placeholders(self) -> TuneConfig:
        for name in ("name", "output"):
            try:
                self.resolved(getattr(self, name), "hlf")
            except (KeyError, IndexError, ValueError) as e:
                raise ValueError(f"tune.{name}: unknown placeholder {e} in {getattr(self, name)!r}; "
                                 "use {model} or {name}") from None
        return self

    @field_validator("parameters")
    @classmethod
    def _valid_space(cls, value: dict[str, Parameter]) -> dict[str, Parameter]:
        if not value:
            raise ValueError("no parameters to tune")
        for name, p in value.items():
            _check_parameter(name, p)
        return value

    @model_validator(mode="after")
    def _grid_needs_points(self) -> TuneConfig:
        if self.algorithm == "grid":
            missing = [n for n, p in self.parameters.items() if p.choices is None and p.step is None]
            if missing:
                raise ValueError(f"the grid algorithm needs a step (or choices) for {', '.join(missing)}")
        return self


def _check_parameter(name: str, p: Parameter) -> None:
    """Fill in ``p.type`` and check ``p`` against the train setting it tunes: every value it can take must be
    valid there, so a space is rejected before any trial runs."""
    if name not in TrainConfig.model_fields or name in _NOT_TUNABLE:
        tunable = [n for n in TrainConfig.model_fields if n not in _NOT_TUNABLE]
        close = difflib.get_close_matches(name, tunable, n=1)
        raise ValueError(f"{name} is not a train setting one can tune" + (f"; did you mean {close[0]}?" if close
                         else f"; tunable: {', '.join(tunable)}"))
    annotation = TrainConfig.model_fields[name].annotation
    number = next((t for t in (int, float) if t in (annotation, *get_args(annotation))), None)
    kind = "categorical" if p.choices is not None else None if get_origin(annotation) is list else \
        {int: "int", float: "float"}.get(number)
    if kind is None:
        raise ValueError(f"{name}: give choices (train.{name} is not a number)")
    if p.type not in (None, kind) and not (p.type == "int" and kind == "float"):
        raise ValueError(f"{name}: type {p.type} does not fit train.{name} ({kind})")
    object.__setattr__(p, "type", p.type or kind)
    if p.choices is not None:
        if not p.choices:
            raise ValueError(f"{name}: choices is empty")
        if p.low is not None or p.high is not None:
            raise ValueError(f"{name}: give either choices or low/high, not both")
        values = p.choices
    else:
        if p.low is None or p.high is None:
            raise ValueError(f"{name}: give low and high (or choices)")
        if not p.low < p.high:
            raise ValueError(f"{name}: empty range: low {p.low:g} must be below high {p.high:g}")
        if p.scale == "log" and p.low <= 0:
            raise ValueError(f"{name}: a log scale needs low > 0 (got {p.low:g})")
        if p.scale == "log" and p.step is not None:
            raise ValueError(f"{name}: a log scale takes no step")
        if p.step is not None and abs((p.high - p.low) / p.step - round((p.high - p.low) / p.step)) > 1e-9:
            raise ValueError(f"{name}: step {p.step:g} does not divide the range {p.low:g} to {p.high:g}")
        if p.type == "int" and not all(float(v).is_integer() for v in (p.low, p.high, p.step or 1)):
            raise ValueError(f"{name}: an int range needs whole low, high and step")
        values = [int(p.low), int(p.high)] if p.type == "int" else [p.low, p.high]
    for v in values:
        try:
            TrainConfig(**{name: v})
        except ValidationError as e:
            raise ValueError(f"{name}: {v!r} is not a valid train.{name}: {e.errors()[0]['msg']}") from None


class EvaluateConfig(_Section):
    """What ``topoflow evaluate`` compares."""

    data: str = Field("out/prepared", description="a prepared dataset (its test split is used), or an "
                      "ingested one (every event, with each model's own preprocessing)")
    models: list[str] = Field(default_factory=lambda: ["out/models/inclusive"], description="exported model folders")
    output: str = Field("out/report", description="URL of the report folder (JSON, Markdown, PNG)")
    batch_size: int = Field(1024, ge=1)


class PredictConfig(_Section):
    """What ``topoflow predict`` scores and writes."""

    model: str = Field("out/models/inclusive", description="exported model folder")
    inputs: list[str] = Field(default_factory=list, description="URLs or globs of Delphes ROOT files, or one "
                              "ingested dataset")
    output: str = Field("out/predictions", description="URL of the Parquet predictions to write")
    batch_size: int = Field(2_000, ge=1, description="events read, selected and scored together")


class ServeConfig(_Section):
    """How ``topoflow serve`` answers (KServe V1/V2 REST and V2 gRPC)."""

    model: str = Field("out/models/inclusive", description="exported model folder (any URL)")
    name: str = Field("topoflow", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
                      description="the model's name in request paths (/v2/models/NAME/infer)")
    backend: Literal["onnx", "saved_model"] = Field("onnx", description="onnx: ONNX Runtime, the native GRU "
                                                    "(fast); saved_model: TensorFlow")
    host: str = Field("127.0.0.1", description="listen address (0.0.0.0 in a container)")
    http_port: int = Field(8080, ge=0, le=65535)
    grpc_port: int = Field(8081, ge=0, le=65535)
    threads: int = Field(1, ge=1, description="ONNX Runtime threads per model call: 1 is fastest for batches "
                         "of a few dozen events (2 threads ran 256-event requests at 0.6x the speed of 1)")
    max_batch_events: int = Field(256, ge=1, description="most events the batcher runs together")
    max_wait_ms: float = Field(2.0, ge=0, le=1000, description="longest a request waits for others to join "
                               "its batch")
    max_events_per_request: int = Field(4096, ge=1)
    max_request_bytes: int = Field(16 * 2**20, ge=1024, description="largest request body accepted")


class DeployConfig(_Section):
    """Whether and how the pipeline deploys the best model as a KServe InferenceService."""

    enabled: bool = Field(True, description="deploy when the best model passes min_auc")
    min_auc: float = Field(0.95, ge=0, le=1, description="deploy only a model whose smallest per-class "
                           "test AUC reaches this")
    name: str = Field("topoflow", pattern=r"^[a-z]([-a-z0-9]*[a-z0-9])?$", description="InferenceService name")
    runtime: Literal["topoflow", "triton"] = Field(
        "topoflow", description="topoflow: the custom predictor (raw events and features); triton: KServe's "
        "Triton runtime on the ONNX export (features only)")
    service_account: str = Field("topoflow-serve", description="service account with the model storage's "
                                 "credentials (KServe's storage initializer reads them)")
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    concurrency_target: int = Field(32, ge=1, description="in-flight requests per replica before scaling out")
    cpu: str = "2"
    memory: str = "2Gi"
    timeout_s: int = Field(600, ge=1, description="how long to wait for the InferenceService to be Ready")


class Toleration(_Section):
    key: str
    operator: Literal["Exists", "Equal"] = "Exists"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None


class PipelineConfig(_Section):
    """How the Kubeflow pipeline runs on a cluster (``topoflow pipeline``); ignored by local stages."""

    namespace: str = Field("topoflow", description="namespace of the SparkApplications the pipeline creates")
    spark_launcher: Literal["kubernetes", "local"] = Field(
        "kubernetes", description="kubernetes: ingest and prepare run as SparkApplications (Spark operator); "
        "local: Spark inside the pipeline pod (and with `topoflow pipeline run --local`)")
    spark_service_account: str = Field("topoflow-spark", description="service account of Spark drivers")
    s3_secret: str | None = Field("topoflow-s3", description="Secret with keys access_key_id and "
                                  "secret_access_key, given to every task as AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
    xrootd_secret: str | None = Field(None, description="Secret holding an X.509 proxy (key x509up) for XRootD/EOS, "
                                      "mounted at /etc/topoflow/xrootd")
    cpu: str = Field("2", description="CPU request and limit of every task but training")
    memory: str = Field("4Gi", description="memory request and limit of every task but training")
    train_cpu: str = Field("4", description="CPU request and limit of each training task")
    train_memory: str = Field("16Gi", description="memory request and limit of each training task")
    gpus: int = Field(1, ge=0, description="GPUs per training task (0: train on CPU)")
    train_restarts: int = Field(3, ge=0, description="multiworker: restarts of a TFJob's workers (from their last "
                                "checkpoint, kept on pvc) before the job fails")
    gpu_resource: str = Field("nvidia.com/gpu", description="the extended resource name of the GPUs")
    gpu_node_selector: dict[str, str] = Field(default_factory=lambda: {"nvidia.com/gpu.present": "true"},
                                              description="labels of the nodes training runs on when gpus > 0")
    gpu_tolerations: list[Toleration] = Field(
        default_factory=lambda: [Toleration(key="nvidia.com/gpu", effect="NoSchedule")],
        description="taints of GPU nodes that training tolerates")
    pvc: str | None = Field(None, description="PersistentVolumeClaim mounted at pvc_mount in every task")
    pvc_mount: str = "/data"
    models: list[Literal["hlf", "gru", "inclusive"]] = Field(
        default_factory=lambda: ["hlf", "gru", "inclusive"], description="the models trained in parallel")
    generate: bool = Field(False, description="generate events first (generate.*) instead of reading ingest.datasets")


class Config(_Section):
    """The whole configuration; one section per concern."""

    spark: SparkConfig = Field(default_factory=SparkConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    prepare: PrepareConfig = Field(default_factory=PrepareConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    predict: PredictConfig = Field(default_factory=PredictConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    deploy: DeployConfig = Field(default_factory=DeployConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)

    def public_dump(self, exclude: dict | None = None, **options) -> dict:
        """The settings as JSON-ready data without any secret, whatever ``options`` (model_dump's)
        say: what may travel in a pipeline spec or a pod's arguments (tasks read the secrets from
        Kubernetes Secrets instead)."""
        secrets: dict[str, Any] = {}
        for section, name in _SECRETS:
            secrets.setdefault(section, set()).add(name)
        return self.model_dump(mode="json", exclude=secrets | (exclude or {}), **options)

    def to_yaml(self) -> str:
        """The effective configuration as YAML: secrets masked, settings taken from the environment say so."""
        data = self.model_dump(mode="json")
        for name in StorageConfig._ENV:
            if var := self.storage.env_source(name):
                data["storage"][name] = f"<from environment {var}>"
        return yaml.safe_dump(data, sort_keys=False)


# (section, field) of every secret; a secret is taken as written and never shown, whatever its shape
_SECRETS = frozenset(
    (section, name)
    for section, field in Config.model_fields.items()
    for name, f in field.annotation.model_fields.items()
    if SecretStr in (f.annotation, *get_args(f.annotation))
)
_STR_TAG, _NULL_TAG = "tag:yaml.org,2002:str", "tag:yaml.org,2002:null"


def as_overrides(data: dict[str, dict[str, Any]]) -> list[str]:
    """``section.key=<JSON>`` for each setting of ``data`` (a dump of a config): what ``--set`` reads back."""
    return [f"{section}.{key}={json.dumps(value)}" for section, values in data.items() for key, value in values.items()]


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, text: str | None = None,
                sections: dict[str, str | Path] | None = None) -> Config:
    """Read YAML ``path`` or ``text`` (optional; a pipeline step gets its config as text), merge in
    ``sections`` (section name -> YAML file holding that section, e.g. a search space for ``tune``), apply
    ``section.key=value`` overrides (values read as YAML, secrets as written), validate. Errors name the
    setting and the fix, and never show a secret (hence ``from None``: yaml's and pydantic's own messages
    quote the input)."""
    data: dict[str, Any] = {}
    files = [str(path)] if path is not None else []
    if path is not None or text is not None:
        data = _read_mapping(path, text)
    for section, file in (sections or {}).items():
        data[section] = {**(data.get(section) or {}), **_read_mapping(file)}
        files.append(str(file))
    for item in overrides or []:
        _override(data, item)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        located = f" in file {' + '.join(files)}" if files else " in the configuration text" if text else ""
        raise ConfigError(f"invalid configuration{located}:\n" + "\n".join(map(_describe, e.errors()))) from None


def _read_mapping(path: str | Path | None, text: str | None = None) -> dict[str, Any]:
    where = f"in file {path}" if path is not None else "in the configuration text"
    try:
        data = _parse_yaml(Path(path).read_text() if text is None else text) or {}
    except FileNotFoundError as e:
        raise ConfigError(f"config file not found: {str(path)!r}\ncreate it or drop the option naming it") from e
    except (yaml.YAMLError, ValueError) as e:
        raise ConfigError(f"config file is not valid YAML: {_yaml_problem(e)}\n{where}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file must hold a mapping, not {type(data).__name__}\n{where}")
    return data


def _parse_yaml(text: str) -> Any:
    """``yaml.safe_load``, but a scalar secret is kept as written: YAML would read 0123 as 83, 1e3 as 1000.0."""
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        for section, name in _SECRETS:
            for node in (n for s in _values(root, section) for n in _values(s, name)):
                if isinstance(node, yaml.ScalarNode) and node.tag != _NULL_TAG:
                    node.tag = _STR_TAG
        return loader.construct_document(root) if root else None
    finally:
        loader.dispose()


def _values(node: yaml.Node | None, key: str) -> list[yaml.Node]:
    """The value nodes of ``key`` in a mapping node."""
    if not isinstance(node, yaml.MappingNode):
        return []
    return [v for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == key]


def _yaml_problem(e: Exception) -> str:
    """Where and what is wrong, without yaml's snippet of the line, and with names yaml quotes from the text
    (an alias, a tag) masked: a secret may be there. Token names ('<stream end>') and single signs stay."""
    problem = getattr(e, "problem", None) or str(e)
    problem = re.sub(r"""(['"])(.*?)\1""", lambda q: q[0] if re.fullmatch(r"<[\w ]*>|\W?", q[2]) else "'…'", problem)
    mark = getattr(e, "problem_mark", None)
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark else problem


def _override(data: dict[str, Any], item: str) -> None:
    """Apply one ``section.key=value`` to ``data``; the value is never echoed (the key may be a mistyped secret)."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        shown = re.match(r"[\w.]*", item)[0]  # not the rest: it may be a secret after a mistyped '='
        raise ConfigError(f"--set {shown}…: expected section.key=value, e.g. --set train.epochs=3")
    *parents, leaf = path = tuple(key.split("."))
    if path in _SECRETS or not raw:
        value: Any = raw
    else:
        try:
            value = yaml.safe_load(raw)
        except (yaml.YAMLError, ValueError):
            raise ConfigError(
                f"--set {key}: the value is not valid YAML\nquote it to give text (--set '{key}=\"...\"'), or give "
                "a plain number, true/false, a list [1, 2] or a mapping {a: 1}") from None
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {part} is not a section")
    node[leaf] = value


def _describe(error: dict[str, Any]) -> str:
    """One line per validation error: the setting, what is wrong and the bad value (never a secret's)."""
    loc = error["loc"]
    name = ".".join(map(str, loc))
    if error["type"] == "extra_forbidden":
        model: Any = Config
        for part in loc[:-1]:
            model = model.model_fields[part].annotation
        close = difflib.get_close_matches(str(loc[-1]), model.model_fields, n=1)
        fix = f"did you mean {'.'.join((*loc[:-1], *close))}?" if close else "`topoflow config` lists them all"
        return f"  unknown setting {name}; {fix}"
    secret = any(s[: len(loc)] == loc or loc[: len(s)] == s for s in _SECRETS)
    shown = "a secret: value not shown" if secret else f"got {error['input']!r}"
    return f"  {name}: {error['msg']} ({shown})"
