"""Test helpers shared across tiers (plain functions; the pytest fixtures are in ``tests/conftest.py``).

- ``configs``: the small review corpus, ``make_cfg`` (Hydra Compose API) and ``tiny_run`` (the tiny-run overrides).
- ``processes``: ``lora-exp`` in a fresh process (``cli`` waits, ``start`` does not).
- ``models``: tiny random text models, LoRA config slices, randomised trainables, counting a module's calls.
- ``audio``: tiny Whisper config and the audio PEFT round trip.
- ``results``: hand-written ``results.json`` files for the report and pairing tests.
- ``sweeps``: a sweep file's job grid as override lists, a run's variant label.
- ``parity``: PEFT-parity scaffolding for the LoRA variants.
- ``interrupts``, ``tiny_checkpoints``, ``wandb_file``: stopping a run at an update, saved tiny HF checkpoints,
  reading an offline W&B run file.
"""
