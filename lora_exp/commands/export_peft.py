"""``lora-exp export-peft RUN_DIR OUT_DIR [--force]``: a LoRA run's adapter (and head) in the PEFT layout."""

from __future__ import annotations

from pathlib import Path

from lora_exp.errors import LoraExpError


def main(*args: str) -> int:
    """Rebuild RUN_DIR's model with its adapter and write ``adapter_config.json`` and
    ``adapter_model.safetensors`` into OUT_DIR (a new or empty folder; ``--force`` replaces the files)."""
    from lora_exp.adapters import init_state, store
    from lora_exp.adapters.peft_format import export_peft
    from lora_exp.config.schema import typed_config
    from lora_exp.inference import adapter_labels
    from lora_exp.training.job import build_model_for
    from lora_exp.training.rundir import recorded_config

    force = "--force" in args
    paths = [a for a in args if a != "--force"]
    if len(paths) != 2 or any(a.startswith("-") for a in paths):
        raise LoraExpError(f"export-peft: usage: lora-exp export-peft RUN_DIR OUT_DIR [--force] (got {list(args)})")
    run_dir, out = Path(paths[0]), Path(paths[1])
    if out.exists() and not out.is_dir():
        raise LoraExpError(f"export-peft: OUT_DIR={str(out)!r} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise LoraExpError(
            f"export-peft: OUT_DIR={str(out)!r} is not empty; give a new or empty folder, or --force to replace "
            "the adapter files in it"
        )
    cfg = recorded_config(run_dir)
    if cfg.method.name != "lora":
        raise LoraExpError(f"export-peft: {str(run_dir)!r} is a method={cfg.method.name} run; only lora exports")
    meta, tensors = store.read_adapter(run_dir / "adapter")
    _, model, _, _ = build_model_for(typed_config(cfg), adapter_labels(meta))  # its classes (or a score), as trained
    if init_state.exists(run_dir):  # lora.init=eva: the saved ranks
        init_state.restore_state(model, run_dir)
    store.load_into(model, tensors, str(run_dir / "adapter"))
    export_peft(model, out, meta)
    store.make_readable(out)
    print(f"wrote {out / 'adapter_config.json'} and {out / 'adapter_model.safetensors'}")
    return 0
