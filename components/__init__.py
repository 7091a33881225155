"""topoflow's Kubeflow Pipelines components: typed inputs and outputs and a docstring; each body
calls one function of :mod:`topoflow.steps` (the stage code the CLI runs). Every component takes
the whole configuration as YAML text (``config``, secrets never included) and passes data as
artifacts whose ``metadata["url"]`` is where the stage wrote them.

On a cluster they run in topoflow's images (:mod:`topoflow.images`); locally (``kfp.local``,
``topoflow pipeline run --local``) in this Python environment.
"""

from kfp import dsl
from kfp.dsl import HTML, ClassificationMetrics, Dataset, Input, Markdown, Metrics, Model, Output

from topoflow import images


@dsl.component(base_image=images.SPARK, install_kfp_package=False)
def generate(config: str, events: Output[Dataset]):
    """Generate Delphes-format events of every class (when pipeline.generate is set; else nothing)."""
    from topoflow import steps

    steps.record(events, steps.generate(config), config)


@dsl.component(base_image=images.SPARK, install_kfp_package=False)
def ingest(config: str, events: Input[Dataset], ingested: Output[Dataset]):
    """Select events with an isolated lepton and compute features: the generated ``events`` when
    there are any, else the config's ingest.datasets (as a SparkApplication on a cluster)."""
    from topoflow import steps

    steps.record(ingested, steps.ingest(config, events.metadata.get("url", "")), config)


@dsl.component(base_image=images.SPARK, install_kfp_package=False)
def prepare(config: str, ingested: Input[Dataset], prepared: Output[Dataset]):
    """Balance, split (train/validation/test), scale: the datasets every model trains on."""
    from topoflow import steps

    steps.record(prepared, steps.prepare(config, ingested.metadata["url"]), config)


@dsl.component(base_image=images.SPARK, install_kfp_package=False)
def predict(config: str, model: Input[Model], predictions: Output[Dataset]):
    """Score the config's predict.inputs (Delphes ROOT files or one ingested dataset) with ``model``: one
    Parquet row per event (as a SparkApplication on a cluster). Not part of topoflow's pipeline: compose it
    in your own, e.g. after a train task or with an imported Model artifact."""
    from topoflow import steps

    steps.record(predictions, steps.predict(config, model.metadata["url"]), config)


@dsl.component(base_image=images.TRAIN, install_kfp_package=False)
def tune(config: str, prepared: Input[Dataset], model_name: str) -> str:
    """Tune one classifier's train settings (a Katib Experiment with tune.backend katib, else trials on Spark
    in this pod); returns the best trial's settings as JSON for the train step."""
    from topoflow import steps

    return steps.tune(config, prepared.metadata["url"], model_name)


@dsl.component(base_image=images.BASE, install_kfp_package=False)
def untuned(config: str) -> str:
    """The train settings when the pipeline does not tune: none ("{}"), so training takes the config's."""
    return "{}"


@dsl.component(base_image=images.TRAIN, install_kfp_package=False)
def train(config: str, prepared: Input[Dataset], model_name: str, model: Output[Model], tuned: str = ""):
    """Train one classifier (hlf, gru or inclusive), with the tuned settings when given (JSON), and export it
    for serving: here, or with train.engine multiworker or bigdl on the cluster as a TFJob or SparkApplication
    that this task launches and waits for."""
    from topoflow import steps

    steps.record(model, steps.train(config, prepared.metadata["url"], model_name, tuned), config)
    model.metadata["model"] = model_name


@dsl.component(base_image=images.TRAIN, install_kfp_package=False)
def evaluate(config: str, prepared: Input[Dataset], metrics: Output[Metrics], report_md: Output[Markdown],
             report_html: Output[HTML], hlf_classification: Output[ClassificationMetrics],
             gru_classification: Output[ClassificationMetrics],
             inclusive_classification: Output[ClassificationMetrics], hlf: Input[Model] = None,
             gru: Input[Model] = None, inclusive: Input[Model] = None) -> str:
    """Compare the trained models on the test split: per-class AUC and accuracy (metrics), the
    confusion matrix and tt̄ ROC curve per model (classification), the report (Markdown, HTML). Returns
    the URL of the model to serve: the best by mean AUC if it is good enough (deploy.*), else ""."""
    from topoflow import steps

    given = {"hlf": (hlf, hlf_classification), "gru": (gru, gru_classification),
             "inclusive": (inclusive, inclusive_classification)}
    models = {name: m.metadata["url"] for name, (m, _) in given.items() if m is not None}
    report = steps.evaluate(config, prepared.metadata["url"], models, metrics=metrics,
                            classification={name: c for name, (_, c) in given.items()}, markdown=report_md,
                            html=report_html)
    return steps.choose(config, report.results).to_serve


@dsl.component(base_image=images.BASE, install_kfp_package=False)
def deploy(config: str, model_url: str) -> str:
    """Serve the chosen model as a KServe InferenceService and wait until it is Ready; its URL ("" when
    deploy.enabled is false or when run locally)."""
    from topoflow import steps

    return steps.deploy(config, model_url)
