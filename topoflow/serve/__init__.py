"""``topoflow serve``: an exported model behind KServe's model server (V1 and V2 REST, V2 gRPC),
taking raw Delphes events as JSON or the feature tensors of ingestion.

- :mod:`~topoflow.serve.inputs`: what a request may hold, checked (every problem a 400 naming the field);
- :mod:`~topoflow.serve.batcher`: concurrent requests' events run through the model together;
- :mod:`~topoflow.serve.model`: the kserve.Model (load, warm-up, readiness, answers);
- :mod:`~topoflow.serve.server`: KServe's ModelServer bound to ``serve.host``, with size limits.
"""

import sys

from topoflow.extras import require

# KServe parses sys.argv when kserve.model_server is imported, and argparse takes abbreviations:
# `topoflow serve --config x.yaml` would reach it as its --configure_logging and exit.
_argv, sys.argv = sys.argv, sys.argv[:1]
try:
    require("kserve", "serve")
finally:
    sys.argv = _argv

from topoflow.serve.server import serve  # noqa: E402

__all__ = ["serve"]
