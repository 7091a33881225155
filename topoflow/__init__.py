"""topoflow: LHC event-topology classification, from Delphes ROOT files to a served model."""

__version__ = "0.1.0"

#: Class labels, fixed by SPEC.md: the label is the index, the one-hot order is this order.
CLASSES = ("qcd", "ttbar", "wjets")
CLASS_TITLES = {"qcd": "QCD multijet", "ttbar": "tt̄", "wjets": "W(→ℓν)+jets"}
