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
from topoflow.config import Config, load_config
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
flavour and jets faking electrons (generate.qcd_fake_fraction; see the README). Every event passes the generator lepton filter (an e or μ with
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

Every epoch is checkpointed (checkpoint_dir) and prints `epoch=N loss=… val_auc=…` on a line of
its own (the format Katib's StdOut collector reads; val_* are on the validation split, never on
test); TensorBoard logs go to <checkpoint_dir>/logs. A killed run continues with --resume (same
settings) and reaches the same result; an existing checkpoint is never discarded without --restart.

examples:
  topoflow train --model inclusive --epochs 6
  topoflow train --model gru --set train.bucket=true --set train.gru_units=64
  topoflow train --model inclusive --resume
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
                     help="then plot generated vs real Delphes distributions per class (generate.reference)")

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
    restart = tr.add_mutually_exclusive_group()
    restart.add_argument("--resume", action="store_true", help="continue from the last checkpointed epoch")
    restart.add_argument("--restart", action="store_true", help="discard the checkpoint and start afresh")

    ev = stage("evaluate", "trained models → comparative physics report", _EVALUATE_HELP, _run_evaluate, writes)
    ev.add_argument("--model", dest="models", action="append", metavar="URL",
                    help="exported model folder (repeatable; evaluate.models)")
    ev.add_argument("--data", metavar="URL", help="prepared dataset (its test split is used) or an ingested "
                    "one (every event, each model's own preprocessing) (evaluate.data)")
    ev.add_argument("--output", metavar="URL", help="report folder (evaluate.output)")

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
    out = [f"{section}.{n}={json.dumps(getattr(args, n))}" for n in names if getattr(args, n, None) is not None]
    if getattr(args, "master", None):
        out.append(f"spark.master={json.dumps(args.master)}")
    if getattr(args, "overwrite", False):
        out.append("storage.overwrite=true")
    return out


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

        from topoflow.generate.validate import validation_plots

        gc = config.generate
        Path(gc.validation_dir).mkdir(parents=True, exist_ok=True)
        for path in validation_plots(gc.output, gc.reference, Path(gc.validation_dir), config.storage):
            print(f"validation plot: {path}")


def _run_ingest(config: Config, args) -> None:
    from topoflow.ingest import ingest

    print(ingest(config, show_progress=not args.no_progress).table())


def _run_prepare(config: Config, args) -> None:
    from topoflow.prepare import prepare

    print(prepare(config, show_progress=not args.no_progress).table())


def _run_train(config: Config, args) -> None:
    from topoflow.train import train

    print(train(config, resume=args.resume, restart=args.restart, show_progress=not args.no_progress).table())


def _run_evaluate(config: Config, args) -> None:
    from topoflow.evaluate import evaluate

    print(evaluate(config).table())


_STAGE_OVERRIDES = {
    "generate": _generate_overrides,
    "ingest": _ingest_overrides,
    "prepare": lambda a: _flag_overrides("prepare", a, ("input", "output", "seed"))
    + (["prepare.from_original=true"] if a.from_original else []),
    "train": lambda a: _flag_overrides("train", a, ("model", "data", "output", "epochs")),
    "evaluate": lambda a: _flag_overrides("evaluate", a, ("models", "data", "output")),
}


_EXTRAS = {"generate": "generate", "ingest": "spark", "prepare": "spark", "train": "train", "evaluate": "train",
           "pipeline": "pipeline"}  # the extra each command needs


def _stop(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (a pod being evicted) stops as cleanly as Ctrl-C


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _stop)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # py4j logs a traceback on the root logger when Ctrl-C hits a Spark call
        logging.getLogger().handlers[0].addFilter(lambda record: "py4j" not in record.pathname)
    try:
        overrides = args.overrides + _STAGE_OVERRIDES.get(args.command, lambda a: [])(args)
        args.run(load_config(args.config, overrides), args)
    except TopoflowError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:  # a stage whose extra is not installed
        from topoflow.extras import missing

        print(f"error: {missing(e.name, _EXTRAS.get(args.command, 'all'))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if "pyspark" in sys.modules:
            from topoflow.spark import stop_active

            stop_active()
        print("interrupted: no output was committed", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
