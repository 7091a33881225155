"""``topoflow <stage>``: parses arguments into the one :class:`~topoflow.config.Config` and calls the
stage function. Settings come from ``--config FILE`` (YAML), then ``--set section.key=value``, then
the stage's own flags; nothing here defines a setting of its own.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys

from topoflow import CLASSES, __version__
from topoflow.config import Config, as_overrides, load_config
from topoflow.errors import TopoflowError

_EPILOG = """\
settings: every setting has a default; a YAML file (--config) sets any of them and
--set section.key=value overrides one (the value is read as YAML). `topoflow config`
prints them all. Storage URLs: local paths, file://, root://host:port//path (XRootD,
as EOS serves it), s3://bucket/prefix (endpoint and keys from the config or AWS_* vars).
"""

_GENERATE_HELP = """\
Simulate events of each class with Pythia 8 at 13 TeV and topoflow's fast CMS-like detector
simulation, and write Delphes-format ROOT files that `topoflow ingest` reads like real Delphes.
tt̄ and W(→ℓν)+jets as in the original samples; QCD as a defined mixture of semileptonic heavy
flavour and jets faking electrons or muons (generate.qcd_fake_fraction; see the README). Every event passes the generator lepton filter (an e or μ with
pT > 20 GeV, |η| < 2.5). The same seed gives the same files.

examples:
  topoflow generate --events ttbar=3000 --events wjets=3000 --events qcd=6000 --output out/generated
  topoflow generate --output s3://bucket/generated --workers 16
"""

_INGEST_HELP = f"""\
Select events with an isolated lepton from Delphes ROOT files and write, per event, the 14
high-level features and the particle list (up to 801 × 19, unpadded) to Parquet.

One --dataset per class ({', '.join(CLASSES)}); each is a URL or glob of Delphes files.
The output appears atomically: a dataset with _manifest.json is complete. With
--on-bad-file skip, unreadable files are left out and listed in _skipped.json.

examples:
  topoflow ingest --dataset ttbar='data/tt/*.root' --dataset wjets='data/w/*.root' \\
      --dataset qcd='data/qcd/*.root' --output out/ingested
  topoflow ingest --config ingest.yaml --set spark.master=k8s://https://api:6443
  topoflow ingest --dataset ttbar='root://eos.cern.ch//eos/tt/*.root' \\
      --set storage.timeout_s=60 --output s3://bucket/ingested
"""


_PREPARE_HELP = """\
Turn an ingested dataset into training, validation and test datasets: undersample every class
to the smallest (seeded), split by a hash of each event (the same event always lands in the same
split): prepare.test_fraction (0.2) for test, prepare.validation_fraction (0.1) of the rest for
validation, shuffle the training set, fit the scalers on the training split only (HLF min-max,
particle features standardised over real particles) and apply them. Training validates on
validation/ only; test/ is left for topoflow evaluate.

Writes <output>/train, <output>/validation, <output>/test and <output>/preprocessing.json (the
fitted transform that training, evaluation and serving load), all published at once; particle
lists stay unpadded. An existing output is replaced only if topoflow prepare wrote it.

examples:
  topoflow prepare --input out/ingested --output out/prepared
  topoflow prepare --from-original --input s3://bucket/cern-published/trainUndersampled.parquet
"""


_TRAIN_HELP = """\
Train one of the three classifiers of SPEC.md (hlf, gru, inclusive) on a prepared dataset,
streamed from any URL, on CPU or GPU(s), then export it for serving: model.keras, saved_model/,
model.onnx, preprocessing.json and a model card, in one folder.

Every epoch is checkpointed (checkpoint_dir) and prints `<UTC time> epoch=N loss=… val_auc=…` on a line of
its own (the format Katib's StdOut collector reads; val_* are on the validation split, never on
test); TensorBoard logs go to <checkpoint_dir>/logs. A killed run continues with --resume (same
settings) and reaches the same result; an existing checkpoint is never discarded without --restart.

Engines (--engine, train.engine), same models, checkpoints and export:
  keras        one process, on the CPU or the machine's GPUs (default)
  multiworker  TensorFlow MultiWorkerMirroredStrategy: --workers N processes on this machine (a TFJob's
               workers on Kubernetes); batch_size stays the global batch, so results do not depend on N
  bigdl        BigDL on Spark (local[N] with --workers N) in its own Python 3.9 environment: make bigdl-env

examples:
  topoflow train --model inclusive --epochs 6
  topoflow train --model gru --set train.bucket=true --set train.gru_units=64
  topoflow train --model inclusive --resume
  topoflow train --model inclusive --engine multiworker --workers 2
  topoflow train --model hlf --engine bigdl --workers 2
"""

_TUNE_HELP = """\
Tune the train.* settings of one model: trials train on the prepared dataset (train.data) with
settings drawn from the search space, and are scored by the objective on the validation split
(default: val_auc, the mean of the per-class AUCs, at the last epoch; never the test split).

The search space is the tune section of the config, or a YAML file of it (--space):

  parameters:                      # any train setting: a range or choices
    learning_rate: {low: 1.0e-4, high: 1.0e-2, scale: log}
    hlf_units: {choices: [[50, 20, 10], [100, 50], [32, 32, 32]]}
    batch_size: {choices: [64, 128, 256]}
    dropout: {low: 0.0, high: 0.4, step: 0.1}
  objective: {metric: val_auc}     # or val_loss, val_accuracy (direction follows, or set it)
  algorithm: tpe                   # random, grid (ranges need a step) or tpe
  trials: 16                       # trials to finish; parallelism: how many run at once
  parallelism: 2
  early_stopping: {enabled: true, min_trials: 3, start_epoch: 2}   # the median rule

Backends: spark (default) runs each trial as a Spark task (locally one per core, each with its
share of the cores) through the normal training code, an Optuna study proposing trials (ask and
tell); a trial whose best objective by epoch start_epoch is worse than the completed trials' mean
there (Katib's medianstop rule) is stopped. katib writes (--emit FILE) or runs a Katib Experiment of the same space on
Kubernetes, one Job per trial, metrics read from the `epoch=N val_auc=...` lines training prints.

The study lives at tune.output (default out/tuning/<model>): a journal updated after each trial,
trials.json, trials.parquet, trials.png (objective per trial, per epoch and per parameter) and
best.yaml, the best trial's configuration: `topoflow train --config best.yaml` trains it.
Running the same command again continues the study: finished trials are kept; trials that ran
when it was killed are lost, not repeated. An invalid space is refused before any trial runs.

examples:
  topoflow tune --model hlf --space tune-hlf.yaml --trials 24 --parallelism 2
  topoflow train --config out/tuning/hlf/best.yaml --restart
  topoflow tune --model inclusive --space tune.yaml --backend katib --emit experiment.yaml
"""

_EVALUATE_HELP = """\
Evaluate exported models on the whole test split of a prepared dataset (the model must have
been trained on data with the same preprocessing), or on every event of an ingested dataset
(each model applies its own preprocessing: judge a model on another sample, e.g. real Delphes
files), and write one report comparing them: per-class ROC AUC with its bootstrap uncertainty,
accuracy, confusion matrix, the trigger view (signal efficiency at 1 % and 10 % false-positive
rate, false-positive rate at 99 % efficiency) as report.json, report.md and PNG plots (ROC per
class, confusion, score distributions, training curves).

examples:
  topoflow evaluate --model out/models/hlf --model out/models/inclusive
  topoflow evaluate --model out/models/inclusive --data out/ingested-real-delphes --output out/report-real
"""


_PREDICT_HELP = """\
Score events with an exported model, on Spark. Inputs are Delphes ROOT files (paths, root://,
s3:// URLs or globs; --input is repeatable), read through ingestion's selection and features, or
one ingested dataset (a folder written by topoflow ingest, given alone), whose true classes are kept.
Writes one Parquet row per event read, published atomically (_manifest.json last):

  source_file, entry        where the event comes from
  selected                  whether it passes the selection (an isolated lepton, as ingest selects)
  p_qcd, p_ttbar, p_wjets   the model's probabilities (null when not selected)
  predicted                 the most probable class (null when not selected)
  label                     the true class (ingested datasets only)

The model runs with ONNX Runtime (the folder's model.onnx), loaded once per Spark executor process.
ROOT files are read with the ingest settings (ingest.muon_collection, ingest.entries_per_partition);
with --on-bad-file skip, unreadable files or entries are left out and listed in _skipped.json.

examples:
  topoflow predict --model out/models/inclusive --input 'data/delphes/*.root' --output out/predictions
  topoflow predict --model s3://bucket/models/inclusive --input 'root://eos.example//store/run1/*.root' \\
      --input s3://bucket/run2/extra.root --output s3://bucket/predictions --master 'local[8]'
  topoflow predict --model out/models/hlf --input out/ingested --output out/predictions-ingested

reading the output with pandas:
  import pandas as pd
  df = pd.read_parquet("out/predictions")         # one row per event read
  df[df.selected].groupby("predicted").size()     # events per predicted class
  ttbar = df[df.p_ttbar > 0.9]                    # a tight tt̄ selection (nulls compare False)
"""


_SERVE_HELP = """\
Serve an exported model with KServe's model server: KServe V1 and V2 (Open Inference Protocol)
over REST, and V2 over gRPC. It takes raw events, the Delphes collections of each event as JSON
(the fields of SPEC.md; one object per collection entry, or an object of equal-length lists), run
through ingestion's selection and features; or the features themselves: V2 tensors hlf FP32 [n,14]
and particles FP32 [n,L,19] (unscaled, as ingest writes them; L <= 801, zero rows at the end),
optional lengths INT64 [n]. The model's own preprocessing is applied.

Answers: the probabilities of qcd, ttbar, wjets, the predicted class, and, for raw events,
whether each passed the selection; an event it rejects gets NaN probabilities (null in JSON)
and no class.
Concurrent requests are batched (serve.max_batch_events, serve.max_wait_ms). It listens on
127.0.0.1 unless --host says otherwise (0.0.0.0 in a container); it is ready
(/v2/health/ready) once the model is loaded and warmed up. A bad request gets 400 (gRPC
INVALID_ARGUMENT) naming the field; bodies over serve.max_request_bytes get 413; at most
serve.max_events_per_request events per request.

examples:
  topoflow serve --model out/models/inclusive
  topoflow serve --model s3://bucket/models/inclusive --host 0.0.0.0 --set serve.threads=2

calling it:
  curl localhost:8080/v2/health/ready
  curl localhost:8080/v1/models/topoflow:predict -H 'Content-Type: application/json' \\
      -d '{"instances": [{"Electron": [{"PT": 41.2, "Eta": 0.3, "Phi": 1.1, "Charge": -1}],
           "Muon": [], "Jet": {"PT": [55.0], "Eta": [0.1], "BTag": [1]},
           "MissingET": {"MET": 38.0, "Phi": -2.0}, "EFlowTrack": [], "EFlowPhoton": [],
           "EFlowNeutralHadron": []}]}'
  curl localhost:8080/v2/models/topoflow/infer -H 'Content-Type: application/json' \\
      -d '{"inputs": [{"name": "hlf", "datatype": "FP32", "shape": [1, 14],
                       "data": [120, 38, -2, 70, 2, 1, 41.2, 0.3, 1.1, 0, 0, 0, -1, 1]},
                      {"name": "particles", "datatype": "FP32", "shape": [1, 1, 19],
                       "data": [43.1, 18.7, 36.7, 12.6, 41.2, 0.3, 1.1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, -1]}]}'
  # raw events over V2: {"name": "events", "datatype": "BYTES", "shape": [k], "data": ["<event JSON>", ...]}

  python, gRPC (port 8081; answers come as raw bytes, in the order probabilities, predicted[, selected]):
    import grpc, numpy as np
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb, grpc_predict_v2_pb2_grpc as rpc
    stub = rpc.GRPCInferenceServiceStub(grpc.insecure_channel("localhost:8081"))
    hlf, particles = np.zeros((1, 14), np.float32), np.zeros((1, 1, 19), np.float32)
    tensor = pb.ModelInferRequest.InferInputTensor
    response = stub.ModelInfer(pb.ModelInferRequest(model_name="topoflow", inputs=[
        tensor(name="hlf", datatype="FP32", shape=hlf.shape), tensor(name="particles", datatype="FP32",
        shape=particles.shape)], raw_input_contents=[hlf.tobytes(), particles.tobytes()]))
    probs = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(-1, 3)
"""


_PIPELINE_HELP = """\
The whole pipeline as Kubeflow Pipelines v2: [generate] → ingest → prepare → train (hlf, gru,
inclusive in parallel) → evaluate. On a cluster, ingest and prepare run as SparkApplications
(Spark operator), training on GPU nodes; S3 keys come from the Secret pipeline.s3_secret, never
from the pipeline spec. Resources, GPUs and secrets are pipeline.* settings.

examples:
  topoflow pipeline compile --config cluster.yaml --output topoflow.yaml   # for the KFP UI
  topoflow pipeline submit --config cluster.yaml --host https://kubeflow.example/pipeline \\
      --token-file ~/.kfp-token --experiment topoflow
  topoflow pipeline run --local --config configs/default.yaml              # no cluster
"""


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE", help="YAML file with any settings")
    common.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting, e.g. --set spark.master=local[2] (repeatable)")
    common.add_argument("-v", "--verbose", action="store_true", help="log what happens (INFO level)")
    common.add_argument("--no-progress", action="store_true", help="no progress bars")
    writes = argparse.ArgumentParser(add_help=False)
    writes.add_argument("--overwrite", action="store_true",
                        help="replace the output folder even if another stage or program wrote it (storage.overwrite)")
    spark = argparse.ArgumentParser(add_help=False)
    spark.add_argument("--master", metavar="URL", help="Spark master (spark.master), e.g. local[4] or k8s://…")

    parser = argparse.ArgumentParser(
        prog="topoflow", description="LHC event-topology classification pipeline (QCD / tt̄ / W+jets).",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"topoflow {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<stage>")

    def stage(name: str, summary: str, description: str, run, *parents):
        p = sub.add_parser(name, parents=[common, *parents], help=summary, description=description,
                           epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(run=run)
        return p

    gen = stage("generate", "Pythia 8 + fast detector simulation → Delphes-format ROOT files", _GENERATE_HELP,
                _run_generate, writes)
    gen.add_argument("--events", action="append", default=[], metavar="CLASS=N",
                     help="filtered events of one class (repeatable; generate.events)")
    gen.add_argument("--output", metavar="URL", help="folder for the ROOT files (generate.output)")
    gen.add_argument("--seed", type=int, help="base seed (generate.seed)")
    gen.add_argument("--workers", type=int, help="parallel processes (generate.workers)")
    gen.add_argument("--validate", action="store_true",
                     help="then compare generated with real Delphes events per class (generate.reference): "
                          "plots, and a table of means with KS tests (printed, and in generate.validation_dir)")

    ing = stage("ingest", "Delphes ROOT files → selected events with features", _INGEST_HELP, _run_ingest, writes, spark)
    ing.add_argument("--dataset", action="append", default=[], metavar="CLASS=URL",
                     help="input files of one class (repeat for several globs or classes)")
    ing.add_argument("--output", metavar="URL", help="where to write the Parquet dataset (ingest.output)")
    ing.add_argument("--on-bad-file", choices=("fail", "skip"),
                     help="fail (default): stop before writing; skip: leave the file out and list it")

    prep = stage("prepare", "ingested events → balanced, split, scaled datasets", _PREPARE_HELP, _run_prepare, writes, spark)
    prep.add_argument("--input", metavar="URL", help="ingested dataset (prepare.input)")
    prep.add_argument("--output", metavar="URL", help="where to write (prepare.output)")
    prep.add_argument("--from-original", action="store_true",
                      help="input is in the original CERN schema (HLF_input, GRU_input, encoded_label)")
    prep.add_argument("--seed", type=int, help="seed of balancing, split and shuffle (prepare.seed)")

    tr = stage("train", "prepared data → trained, exported classifier", _TRAIN_HELP, _run_train, writes)
    tr.add_argument("--model", choices=("hlf", "gru", "inclusive"), help="which classifier (train.model)")
    tr.add_argument("--data", metavar="URL", help="prepared dataset (train.data)")
    tr.add_argument("--output", metavar="URL", help="export folder (train.output)")
    tr.add_argument("--epochs", type=int, help="train.epochs")
    tr.add_argument("--engine", choices=("keras", "multiworker", "bigdl"),
                    help="keras: one process (CPU/GPUs); multiworker: TensorFlow workers; bigdl: BigDL on Spark "
                    "(train.engine)")
    tr.add_argument("--workers", type=int, metavar="N", help="multiworker: worker processes; bigdl: Spark cores "
                    "(train.workers)")
    restart = tr.add_mutually_exclusive_group()
    restart.add_argument("--resume", nargs="?", const=True, choices=("auto",),
                         help="continue from the last checkpointed epoch (--resume auto: if there is one)")
    restart.add_argument("--restart", action="store_true", help="discard the checkpoint and start afresh")

    tu = stage("tune", "search train settings: parallel trials on Spark, or a Katib Experiment", _TUNE_HELP,
                _run_tune, writes, spark)
    tu.add_argument("--space", metavar="FILE", help="YAML file holding the search space (the tune section)")
    tu.add_argument("--model", choices=("hlf", "gru", "inclusive"), help="which classifier (train.model)")
    tu.add_argument("--data", metavar="URL", help="prepared dataset (train.data)")
    tu.add_argument("--name", help="study name (tune.name); the same name continues a study")
    tu.add_argument("--output", metavar="URL", help="where the study lives (tune.output)")
    tu.add_argument("--trials", type=int, help="trials to finish (tune.trials)")
    tu.add_argument("--parallelism", type=int, help="trials at once (tune.parallelism)")
    tu.add_argument("--backend", choices=("spark", "katib"), help="tune.backend")
    tu.add_argument("--emit", metavar="FILE", help="katib: write the Experiment YAML to FILE ('-': stdout) "
                    "instead of running it")

    ev = stage("evaluate", "trained models → comparative physics report", _EVALUATE_HELP, _run_evaluate, writes)
    ev.add_argument("--model", dest="models", action="append", metavar="URL",
                    help="exported model folder (repeatable; evaluate.models)")
    ev.add_argument("--data", metavar="URL", help="prepared dataset (its test split is used) or an ingested "
                    "one (every event, each model's own preprocessing) (evaluate.data)")
    ev.add_argument("--output", metavar="URL", help="report folder (evaluate.output)")

    pred = stage("predict", "exported model + ROOT files or an ingested dataset → predictions per event",
                 _PREDICT_HELP, _run_predict, writes, spark)
    pred.add_argument("--model", metavar="URL", help="exported model folder (predict.model)")
    pred.add_argument("--input", dest="inputs", action="append", metavar="URL",
                      help="Delphes ROOT files: path, URL or glob (repeatable), or one ingested dataset "
                      "(predict.inputs)")
    pred.add_argument("--output", metavar="URL", help="where to write the Parquet predictions (predict.output)")
    pred.add_argument("--on-bad-file", choices=("fail", "skip"), help="as for ingest (ingest.on_bad_file)")

    srv = stage("serve", "exported model → KServe model server (V1/V2 REST, V2 gRPC)", _SERVE_HELP, _run_serve)
    srv.add_argument("--model", metavar="URL", help="exported model folder (serve.model)")
    srv.add_argument("--name", help="the model's name in request paths (serve.name)")
    srv.add_argument("--backend", choices=("onnx", "saved_model"), help="ONNX Runtime or TensorFlow (serve.backend)")
    srv.add_argument("--host", metavar="ADDR", help="listen address (serve.host, default 127.0.0.1)")
    srv.add_argument("--http-port", type=int, metavar="N", help="REST port (serve.http_port)")
    srv.add_argument("--grpc-port", type=int, metavar="N", help="gRPC port (serve.grpc_port)")

    pipe = stage("pipeline", "the Kubeflow pipeline: compile it, submit a run, or run it locally", _PIPELINE_HELP,
                 _run_pipeline)
    pipe.add_argument("action", choices=("compile", "submit", "run"), help="what to do")
    pipe.add_argument("--output", metavar="FILE", default="out/topoflow-pipeline.yaml",
                      help="compile: where to write the pipeline YAML (default %(default)s)")
    pipe.add_argument("--host", metavar="URL", help="submit: the Kubeflow Pipelines API, e.g. https://kubeflow.example/pipeline")
    token = pipe.add_mutually_exclusive_group()
    token.add_argument("--token", help="submit: bearer token (else --token-file or KF_PIPELINES_TOKEN)")
    token.add_argument("--token-file", metavar="FILE", help="submit: file holding the bearer token")
    pipe.add_argument("--experiment", default="topoflow", help="submit: experiment name (default %(default)s)")
    pipe.add_argument("--run-name", help="submit: name of the run")
    pipe.add_argument("--local", action="store_true", help="run: with kfp.local on this machine (required: "
                      "a cluster run is `submit`)")

    stage("config", "print the effective settings as YAML",
          "Print every setting with its effective value (defaults, file, --set).",
          lambda config, args: print(config.to_yaml(), end=""))
    return parser


def _run_pipeline(config: Config, args) -> None:
    from topoflow import pipeline

    if args.action == "compile":
        print(f"pipeline written to {pipeline.compile_pipeline(config, args.output)}")
    elif args.action == "submit":
        if not args.host:
            raise TopoflowError("submit needs --host URL: the Kubeflow Pipelines API endpoint")
        run_id = pipeline.submit(config, args.host, pipeline.read_token(args.token, args.token_file),
                                 args.experiment, args.run_name)
        print(f"submitted run {run_id} to {args.host} (experiment {args.experiment})")
    else:
        if not args.local:
            raise TopoflowError("run executes the pipeline on this machine: add --local "
                                "(to run on a cluster: topoflow pipeline submit --host URL)")
        pipeline.run_local(config)
        print(f"pipeline finished; report in {config.evaluate.output}")


def _flag_overrides(section: str, args, names: tuple[str, ...]) -> list[str]:
    """``section.name=value`` for every flag given (values as JSON, which YAML reads back)."""
    given: dict[str, dict] = {section: {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}}
    if getattr(args, "master", None):
        given["spark"] = {"master": args.master}
    if getattr(args, "overwrite", False):
        given["storage"] = {"overwrite": True}
    return as_overrides(given)


def _ingest_overrides(args) -> list[str]:
    datasets: dict[str, list[str]] = {}
    for item in args.dataset:
        name, sep, url = item.partition("=")
        if not sep or name not in CLASSES or not url:
            raise TopoflowError(f"--dataset {item!r}: expected CLASS=URL with CLASS one of {list(CLASSES)}")
        datasets.setdefault(name, []).append(url)
    return [f"ingest.datasets.{name}={json.dumps(urls)}" for name, urls in datasets.items()] + _flag_overrides(
        "ingest", args, ("output", "on_bad_file"))


def _generate_overrides(args) -> list[str]:
    events = {}
    for item in args.events:
        name, sep, n = item.partition("=")
        if not sep or name not in CLASSES or not n.isdigit():
            raise TopoflowError(f"--events {item!r}: expected CLASS=N with CLASS one of {list(CLASSES)}")
        events[name] = int(n)
    out = [f"generate.events.{name}={n}" for name, n in events.items()]
    return out + _flag_overrides("generate", args, ("output", "seed", "workers"))


def _run_generate(config: Config, args) -> None:
    from topoflow.generate import generate

    print(generate(config, show_progress=not args.no_progress).table())
    if args.validate:
        from pathlib import Path

        from topoflow.generate.validate import validate

        gc = config.generate
        Path(gc.validation_dir).mkdir(parents=True, exist_ok=True)
        paths, table = validate(gc.output, gc.reference, Path(gc.validation_dir), config.storage)
        print(table)
        for path in paths:
            print(f"validation: {path}")


def _run_ingest(config: Config, args) -> None:
    from topoflow.ingest import ingest

    print(ingest(config, show_progress=not args.no_progress).table())


def _run_prepare(config: Config, args) -> None:
    from topoflow.prepare import prepare

    print(prepare(config, show_progress=not args.no_progress).table())


def _run_train(config: Config, args) -> None:
    from topoflow.train import train

    print(train(config, resume=args.resume, restart=args.restart, show_progress=not args.no_progress).table())


def _run_tune(config: Config, args) -> None:
    if config.tune.backend == "katib":
        from topoflow import katib

        if args.emit:
            import yaml

            text = yaml.safe_dump(katib.experiment(config), sort_keys=False, width=120)
            if args.emit == "-":
                print(text, end="")
            else:
                from pathlib import Path

                Path(args.emit).write_text(text)
                print(f"Katib Experiment written to {args.emit}: kubectl apply -n {config.pipeline.namespace} "
                      f"-f {args.emit}")
            return
        best = katib.run(config, namespace=config.pipeline.namespace)
        print(f"best trial {best['trial']}: {config.tune.objective.metric}={best['objective']:.4f} "
              f"{json.dumps(best['parameters'])}")
        return
    if args.emit:
        raise TopoflowError("--emit writes a Katib Experiment: add --backend katib")
    from topoflow.tune import tune

    print(tune(config).table())  # a line per trial is its progress


def _run_evaluate(config: Config, args) -> None:
    from topoflow.evaluate import evaluate

    print(evaluate(config).table())


def _run_predict(config: Config, args) -> None:
    from topoflow.predict import predict

    print(predict(config, show_progress=not args.no_progress).table())


def _run_serve(config: Config, args) -> None:
    from topoflow.serve import serve

    serve(config)


_STAGE_OVERRIDES = {
    "generate": _generate_overrides,
    "ingest": _ingest_overrides,
    "prepare": lambda a: _flag_overrides("prepare", a, ("input", "output", "seed"))
    + (["prepare.from_original=true"] if a.from_original else []),
    "train": lambda a: _flag_overrides("train", a, ("model", "data", "output", "epochs", "engine", "workers")),
    "evaluate": lambda a: _flag_overrides("evaluate", a, ("models", "data", "output")),
    "tune": lambda a: _flag_overrides("train", a, ("model", "data"))
    + _flag_overrides("tune", a, ("name", "output", "trials", "parallelism", "backend")),
    "serve": lambda a: _flag_overrides("serve", a, ("model", "name", "backend", "host", "http_port", "grpc_port")),
    "predict": lambda a: _flag_overrides("predict", a, ("model", "inputs", "output"))
    + ([f"ingest.on_bad_file={a.on_bad_file}"] if a.on_bad_file else []),
}


_EXTRAS = {"generate": "generate", "ingest": "spark", "prepare": "spark", "train": "train", "evaluate": "train",
           "predict": "spark", "serve": "serve", "pipeline": "pipeline", "tune": "train"}  # the extra each command needs


_TERMINATED = 128 + signal.SIGTERM  # the exit code of a process SIGTERM ended: what a TFJob's ExitCode policy retries
_terminated: list[bool] = []


def _stop(signum, frame):
    _terminated.append(True)
    raise KeyboardInterrupt  # SIGTERM (a pod being evicted) stops as cleanly as Ctrl-C


def _failed(code: int) -> int:
    """``code``, or 143 when SIGTERM caused the failure: an evicted pod's work is retried, a bad input's is not."""
    return _TERMINATED if _terminated else code


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _stop)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # py4j logs a traceback on the root logger when Ctrl-C hits a Spark call
        logging.getLogger().handlers[0].addFilter(lambda record: "py4j" not in record.pathname)
    try:
        overrides = args.overrides + _STAGE_OVERRIDES.get(args.command, lambda a: [])(args)
        space = {"tune": args.space} if getattr(args, "space", None) else None
        args.run(load_config(args.config, overrides, sections=space), args)
    except TopoflowError as e:
        print(f"error: {e}", file=sys.stderr)
        return _failed(2)
    except ModuleNotFoundError as e:  # a stage whose extra is not installed
        from topoflow.extras import missing

        print(f"error: {missing(e.name, _EXTRAS.get(args.command, 'all'))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if "pyspark" in sys.modules:
            from topoflow.spark import stop_active

            stop_active()
        print("interrupted: the study is saved; run the same command to continue it" if args.command == "tune"
              else "interrupted: no output was committed", file=sys.stderr)
        return _failed(130)
    return 0


if __name__ == "__main__":
    sys.exit(main())
