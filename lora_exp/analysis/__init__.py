"""Analysis of finished runs: ``report`` (runs -> tables, the fair protocol), ``figures`` and ``stats``.
Reads results.json files; imports nothing that trains."""
