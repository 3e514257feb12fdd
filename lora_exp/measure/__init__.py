"""Measurement: the memory model (``memory``), time and peaks (``timing``) and W&B / environment tracking
(``tracking``). Imports adapters' variant names only."""
