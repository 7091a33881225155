"""Everything serving needs, in one folder at any fsspec URL, published atomically:

    model.keras  saved_model/  model.onnx  preprocessing.json  model_card.json  model_card.md

The preprocessing artifact travels with the model, so the server applies exactly the transform the
model was trained with.
"""

from __future__ import annotations

import json
import tempfile
import time
import warnings
from pathlib import Path

from topoflow import CLASSES, __version__, storage
from topoflow.config import Config, StorageConfig
from topoflow.preprocessing import FILE_NAME, Preprocessing

CARD = "model_card"


def export(model, output: str, sc: StorageConfig, pre: Preprocessing, cfg: Config, history: dict) -> None:
    """Write the Keras file, a TF SavedModel, ONNX, the preprocessing and the model card to ``output``."""
    with tempfile.TemporaryDirectory(prefix="topoflow-export-") as tmp:
        folder = Path(tmp)
        model.save(folder / "model.keras")
        model.export(str(folder / "saved_model"), format="tf_saved_model", verbose=False)
        with warnings.catch_warnings():  # tf2onnx probes np.object, which numpy 2 deprecates
            warnings.simplefilter("ignore", FutureWarning)
            model.export(str(folder / "model.onnx"), format="onnx", verbose=False)
        (folder / FILE_NAME).write_text(pre.to_json())
        card = model_card(model, pre, cfg, history)
        (folder / f"{CARD}.json").write_text(json.dumps(card, indent=2, sort_keys=True))
        (folder / f"{CARD}.md").write_text(card_markdown(card))
        storage.publish_folder(str(folder), output, sc, {"stage": "train", "model": card["model"],
                                                         "files": sorted(p.name for p in folder.iterdir())})


def model_card(model, pre: Preprocessing, cfg: Config, history: dict) -> dict:
    tc = cfg.train
    return {
        "model": tc.model,
        "name": model.name,
        "parameters": int(model.count_params()),
        "inputs": {i.name: list(i.shape) for i in model.inputs},
        "output": f"softmax probabilities for {list(CLASSES)}",
        "classes": list(CLASSES),
        "data": tc.data,
        "training": tc.model_dump(mode="json"),
        "final_metrics": {k: v[-1] for k, v in history.items() if v},
        "splits": {"train": "fits the weights; metrics without a prefix", "validation": "val_* metrics, every epoch",
                   "test": "not seen in training: its numbers come from topoflow evaluate"},
        "history": history,
        "preprocessing": {"file": FILE_NAME, "version": json.loads(pre.to_json())["version"],
                          "fitted_on": pre.fitted_on},
        "topoflow_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def card_markdown(card: dict) -> str:
    metrics = "\n".join(f"| {k} | {v:.4f} |" for k, v in sorted(card["final_metrics"].items()))
    sizes = ", ".join(f"{k}={v}" for k, v in card["training"].items()
                      if k in ("gru_units", "hlf_units", "dense_units", "dropout", "learning_rate", "batch_size", "epochs"))
    return f"""# Model card: topoflow {card['model']} classifier

- Classes (softmax order): {', '.join(card['classes'])}
- Parameters: {card['parameters']:,}; inputs: {', '.join(f'{k} {v}' for k, v in card['inputs'].items())}
- Trained on: `{card['data']}` ({card['preprocessing']['fitted_on'].get('events', '?')} training events fitted the scalers)
- Settings: {sizes}
- Preprocessing: `{card['preprocessing']['file']}` v{card['preprocessing']['version']} (apply it to raw features before the model)
- topoflow {card['topoflow_version']}, {card['created']}

| metric (last epoch) | value |
|---|---:|
{metrics}

Metrics without a prefix are on the `train` split, `val_*` on the `validation` split; the `test`
split is never seen in training: `topoflow evaluate` reports on it.
"""
