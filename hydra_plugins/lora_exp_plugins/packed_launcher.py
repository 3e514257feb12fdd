"""``hydra/launcher=packed`` (conf/hydra/launcher/packed.yaml): ``lora_exp.pack_launcher.PackedLauncher`` under the
name Hydra accepts."""

from lora_exp.pack_launcher import PackedLauncher as _Launcher


class PackedLauncher(_Launcher):
    """See ``lora_exp.pack_launcher.PackedLauncher``."""
