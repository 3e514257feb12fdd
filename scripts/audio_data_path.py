"""Per-epoch cost of the audio data path alone, one torch thread: the old per-batch collator (resample +
log-mel for every batch) vs the features computed once (``featurize``) and read back, over the batches one
epoch of `experiment=gw_whisper_offline` reads (train at batch 32, validation at batch 100). Min of 3 repeats.

  PYTHONPATH=. python scripts/audio_data_path.py data.gw.n_train=200 data.gw.n_validation=100 data.gw.n_test=100
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import torch
from torch.utils.data import DataLoader, RandomSampler

from lora_exp.config.schema import typed_config
from lora_exp.data import audio as audio_data
from lora_exp.data import text as text_data
from lora_exp.models import audio as audio_models
from tests.helpers.configs import make_cfg


def main(overrides: list[str]) -> None:
    torch.set_num_threads(1)
    cfg = typed_config(make_cfg(["experiment=gw_whisper_offline", *overrides]))
    t = cfg.trainer
    splits = text_data.load_splits(cfg.data)
    fe, _, _ = audio_models.build(cfg.model, 2)
    rows = {k: v.rename_column("label", "labels").with_format("numpy") for k, v in splits.items()}
    collate = audio_data.AudioCollator(fe, cfg.data.gw.sample_rate)
    new = audio_data.make_loaders(
        audio_data.featurize(splits, fe, cfg.data.gw.sample_rate), t.batch_size, t.eval_batch_size, torch.Generator()
    )

    def old_epoch() -> None:
        sampler = RandomSampler(rows["train"], generator=torch.Generator().manual_seed(0))
        for _ in DataLoader(rows["train"], batch_size=t.batch_size, sampler=sampler, collate_fn=collate):
            pass
        for _ in DataLoader(rows["validation"], batch_size=t.eval_batch_size, collate_fn=collate):
            pass

    def new_epoch() -> None:
        for _ in new.train:
            pass
        for _ in new.validation:
            pass

    runs: list[tuple[str, Callable[[], None]]] = [("old: collator per batch", old_epoch), ("new: read back", new_epoch)]
    for name, epoch in runs:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            epoch()
            times.append(time.perf_counter() - start)
        print(f"{name}: {min(times):.2f} s per epoch (runs {', '.join(f'{x:.2f}' for x in times)})")


if __name__ == "__main__":
    main(sys.argv[1:])
