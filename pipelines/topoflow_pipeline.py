"""The topoflow pipeline: [generate] → ingest → prepare → [tune →] train (one branch per model, in parallel)
→ evaluate → [deploy, when evaluate found the best model good enough]. Wiring only: resources, GPUs,
node placement, secrets and volumes come from the config's ``pipeline`` section; what each step does
lives in :mod:`topoflow.steps`.
"""

from kfp import dsl, kubernetes

import components as c
from topoflow.config import Config, PipelineConfig
from topoflow.kube import XROOTD_MOUNT
from topoflow.steps import LAUNCHED_ENGINES, config_text


def build(cfg: Config):
    """The pipeline function for ``cfg`` (its YAML, without secrets, is the ``config`` parameter)."""
    pc = cfg.pipeline

    @dsl.pipeline(name="topoflow", description="LHC event-topology classification: Delphes ROOT files → "
                  "selected events → prepared datasets → HLF, GRU and inclusive classifiers → report → "
                  "the best served by KServe")
    def topoflow(config: str = config_text(cfg), tune: bool = cfg.tune.enabled):
        events = _platform(c.generate(config=config), pc).set_display_name("generate")
        ingested = _platform(c.ingest(config=config, events=events.outputs["events"]), pc)
        prepared = _platform(c.prepare(config=config, ingested=ingested.outputs["ingested"]), pc)
        with dsl.If(tune == True, name="tune"):  # noqa: E712 (a pipeline condition, not Python's)
            tuned = {}
            for name in pc.models:
                task = c.tune(config=config, prepared=prepared.outputs["prepared"], model_name=name)
                tuned[name] = _platform(task.set_display_name(f"tune {name}"), pc, pc.train_cpu, pc.train_memory)
        with dsl.Else(name="no-tuning"):
            untuned = _sized(c.untuned(config=config), pc.cpu, pc.memory)
        models = {}
        for name in pc.models:
            # kfp.local resolves dsl.OneOf over parameters only: the branches choose the settings, not the models
            task = c.train(config=config, prepared=prepared.outputs["prepared"], model_name=name,
                           tuned=dsl.OneOf(tuned[name].output, untuned.output))
            if cfg.train.engine in LAUNCHED_ENGINES:  # it starts a TFJob or SparkApplication and waits
                models[name] = _platform(task.set_display_name(f"train {name}"), pc).outputs["model"]
            else:
                models[name] = _trainer(task, name, pc).outputs["model"]
        evaluated = _platform(c.evaluate(config=config, prepared=prepared.outputs["prepared"], **models), pc,
                              pc.cpu, pc.train_memory)
        serve_if_chosen(config, evaluated, pc)

    return topoflow


def _trainer(task, name: str, pc: PipelineConfig):
    """A train task on the training nodes: its sizes, GPUs, their node labels and taints."""
    _platform(task.set_display_name(f"train {name}"), pc, pc.train_cpu, pc.train_memory)
    if pc.gpus:
        task.set_accelerator_type(pc.gpu_resource).set_accelerator_limit(pc.gpus)
        for key, value in pc.gpu_node_selector.items():
            kubernetes.add_node_selector(task, label_key=key, label_value=value)
        for t in pc.gpu_tolerations:
            kubernetes.add_toleration(task, key=t.key, operator=t.operator, value=t.value, effect=t.effect)
    return task


def serve_if_chosen(config, evaluated, pc: PipelineConfig) -> None:
    """The deploy task, run only when ``evaluated`` (a task whose one output is a model URL, "" for none)
    chose a model. Gated on the single output: kfp.local (2.17) resolves a condition on a task's
    ``Output`` but not on one field of a NamedTuple of outputs."""
    chosen = evaluated.outputs["Output"]
    with dsl.If(chosen != "", name="good-enough-to-serve"):
        # no data, no secrets: it only talks to the API server (KServe's storage initializer reads the model)
        _sized(c.deploy(config=config, model_url=chosen), pc.cpu, pc.memory)


def _sized(task, cpu: str, memory: str):
    """Requests = limits; no caching (the data live at URLs the cache cannot see, and a deployment is an
    action, not a result to reuse)."""
    task.set_cpu_request(cpu).set_cpu_limit(cpu).set_memory_request(memory).set_memory_limit(memory)
    return task.set_caching_options(False)


def _platform(task, pc: PipelineConfig, cpu: "str | None" = None, memory: "str | None" = None):
    """:func:`_sized` (the pipeline's sizes by default), S3 keys and the XRootD proxy from Secrets, the volume."""
    _sized(task, cpu or pc.cpu, memory or pc.memory)
    if pc.s3_secret:
        kubernetes.use_secret_as_env(task, secret_name=pc.s3_secret, secret_key_to_env={
            "access_key_id": "AWS_ACCESS_KEY_ID", "secret_access_key": "AWS_SECRET_ACCESS_KEY"})
    if pc.xrootd_secret:
        kubernetes.use_secret_as_volume(task, secret_name=pc.xrootd_secret, mount_path=XROOTD_MOUNT)
        task.set_env_variable("X509_USER_PROXY", f"{XROOTD_MOUNT}/x509up")
    if pc.pvc:
        kubernetes.mount_pvc(task, pvc_name=pc.pvc, mount_path=pc.pvc_mount)
    return task
