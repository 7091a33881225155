"""The single-process engine: Keras ``fit`` on the CPU, one GPU, or all GPUs of the machine (MirroredStrategy)."""

from __future__ import annotations

from topoflow import dataset, storage
from topoflow.models import INPUTS
from topoflow.tf import import_tensorflow

tf = import_tensorflow()


def strategy(tc):
    gpus = tf.config.list_physical_devices("GPU")
    return tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()


def is_chief() -> bool:
    return True


def train(model, run) -> None:
    tc, sc = run.cfg.train, run.cfg.storage
    common = dict(batch_size=tc.batch_size, inputs=INPUTS[tc.model], threads=tc.threads)
    train_ds = dataset.tf_dataset(storage.join(tc.data, "train"), sc, shuffle=True, seed=tc.seed, bucket=tc.bucket,
                                  first_epoch=run.first_epoch, **common)
    val_ds = dataset.tf_dataset(storage.join(tc.data, "validation"), sc, **common)
    model.fit(train_ds, validation_data=val_ds, epochs=tc.epochs, initial_epoch=run.first_epoch,
              steps_per_epoch=tc.steps_per_epoch, shuffle=False, callbacks=run.callbacks,
              verbose=1 if run.verbose else 0)
