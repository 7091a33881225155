"""The three classifiers of SPEC.md, built by name with configurable sizes (Keras 3).

All take the dict ``{"hlf": (batch, 14), "particles": (batch, steps, 19)}`` (each uses what it
needs) and output softmax probabilities in the class order of :data:`topoflow.CLASSES`. The GRU
sees sequences padded at the end and masked, which keeps it on the fused (cuDNN) kernel on GPUs.
For ``engine: bigdl`` the GRU has no biases and applies its reset gate before the recurrent product
(:data:`ENGINE_NOTES`).
"""

from __future__ import annotations

from topoflow.config import TrainConfig
from topoflow.features import HLF_NAMES, PARTICLE_NAMES
from topoflow.tf import import_tensorflow

MODELS = ("hlf", "gru", "inclusive")
# what the model card says about a model an engine trained differently (topoflow.export.model_card)
ENGINE_NOTES = {"bigdl": "GRU without biases, reset gate before the recurrent product (Keras reset_after=False): "
                "BigDL's GRU, trained on sequences padded at the start, where zero biases keep the state 0 "
                "through the padding, so it equals this masked GRU on end-padded input"}
INPUTS = {"hlf": ("hlf",), "gru": ("particles",), "inclusive": ("hlf", "particles")}


def build(cfg: TrainConfig, total_steps: int | None = None):
    """A compiled model for ``cfg.model`` (Adam, categorical cross-entropy, accuracy and AUC).
    ``total_steps`` (batches in the whole run) is what a cosine ``lr_schedule`` decays over."""
    import_tensorflow()
    import keras
    from keras import layers

    hlf = keras.Input((len(HLF_NAMES),), name="hlf")
    seq = keras.Input((None, len(PARTICLE_NAMES)), name="particles")

    # engine bigdl: the GRU BigDL trains (see topoflow.engines.bigdl_worker), exact under masking
    gru_form = dict(use_bias=False, reset_after=False) if cfg.engine == "bigdl" else {}

    def sequence_branch():
        gru = layers.GRU(cfg.gru_units, name="gru", **gru_form)
        return layers.Dropout(cfg.dropout)(gru(layers.Masking(0.0)(seq)))

    if cfg.model == "hlf":
        x, inputs = hlf, {"hlf": hlf}
        for units in cfg.hlf_units:
            x = layers.Dense(units, activation="relu")(x)
    elif cfg.model == "gru":
        x, inputs = sequence_branch(), {"particles": seq}
    else:
        x = layers.Concatenate()([sequence_branch(), layers.Dropout(cfg.dropout)(hlf)])
        x, inputs = layers.Dense(cfg.dense_units, activation="relu")(x), {"hlf": hlf, "particles": seq}
    out = layers.Dense(3, activation="softmax", dtype="float32", name="probabilities")(x)
    model = keras.Model(inputs, out, name=f"topoflow_{cfg.model}")
    lr = cfg.learning_rate
    if cfg.lr_schedule == "cosine" and total_steps:
        lr = keras.optimizers.schedules.CosineDecay(lr, decay_steps=total_steps, alpha=0.05)
    model.compile(keras.optimizers.Adam(lr), "categorical_crossentropy",
                  metrics=["accuracy", keras.metrics.AUC(name="auc", multi_label=True, num_labels=3)])
    return model
