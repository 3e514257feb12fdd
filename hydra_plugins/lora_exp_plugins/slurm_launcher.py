"""``hydra/launcher=slurm`` (conf/hydra/launcher/slurm.yaml): ``lora_exp.launcher.SlurmLauncher`` under the name
Hydra accepts. Needs hydra-submitit-launcher (``pip install lora-exp[slurm]``); without it nothing is defined."""

try:
    from lora_exp.launcher import SlurmLauncher as _Launcher
except ImportError:  # hydra-submitit-launcher is not installed: no SLURM launcher (Hydra's scan must not fail)
    _Launcher = None

if _Launcher is not None:

    class SlurmLauncher(_Launcher):
        """See ``lora_exp.launcher.SlurmLauncher``."""
