"""The Kubeflow pipelines of topoflow (``topoflow_pipeline``): wiring only."""
