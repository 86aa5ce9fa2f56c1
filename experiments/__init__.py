"""Experiment scripts (``python -m experiments.paper``, ``python -m experiments.bench``)."""
