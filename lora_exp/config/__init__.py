"""The config: the schema (``schema``), value checks (``checks.validate``) and job identity (``identity``).

Owns every option name and allowed value. Imports only the choice lists other packages own (adapters'
variants, ``device.DTYPES``, the GW generator's options); nothing that loads a model or data.
"""
