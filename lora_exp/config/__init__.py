"""The config: the schema (``schema``), value checks (``checks.validate``), job identity and the fields that
apply (``identity``), and the command line checked against the schema before Hydra runs it (``cmdline``).

Owns every option name and allowed value. Imports only the choice lists other packages own (adapters'
variants, ``device.DTYPES``, the GW generator's options); nothing that loads a model or data.
"""
