"""Audio features computed once per clip (``data.audio.featurize``) and the frozen-feature cache for audio (no training
run here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, RandomSampler

from lora_exp.data import audio as audio_data
from lora_exp.data import gw as gw_data
from lora_exp.measure import timing
from lora_exp.models import audio as audio_models
from lora_exp.training import job as job_setup
from tests.helpers.audio import GW_SMALL, whisper_cfg
from tests.helpers.configs import make_cfg

RATE = 2048


@pytest.fixture
def splits(lora_exp_cache: Path):
    return gw_data.as_splits(gw_data.GwOptions(n_train=24, n_validation=8, n_test=8))


def test_features_equal_the_collator_and_are_computed_once(splits, lora_exp_cache: Path, monkeypatch) -> None:
    fe, _, _ = audio_models.build(whisper_cfg(audio_max_seconds=6.0), 2)
    feats = audio_data.featurize(splits, fe, RATE)
    rows = splits["train"].with_format("numpy")[:5]
    want = audio_data.AudioCollator(fe, RATE).features(list(rows["audio"]))["input_features"]
    have = torch.as_tensor(feats["train"].with_format("numpy")[:5]["input_features"])
    assert have.shape == (5, 80, 600) and torch.equal(have, want)  # bit-identical to the per-batch path
    assert feats["train"]["labels"][:] == splits["train"]["label"][:]
    files = sorted(p.name for p in (lora_exp_cache / "audio_features").glob("*.arrow"))
    assert [f.split("-")[0] for f in files] == ["test", "train", "validation"]

    calls = []
    original = audio_data.AudioCollator.features
    monkeypatch.setattr(audio_data.AudioCollator, "features", lambda self, a: calls.append(len(a)) or original(self, a))
    again = audio_data.featurize(splits, fe, RATE)  # read back: only the one-clip probe of the shape runs
    assert calls == [1, 1, 1] and torch.equal(
        torch.as_tensor(again["train"].with_format("numpy")[:5]["input_features"]), have
    )
    assert sorted(p.name for p in (lora_exp_cache / "audio_features").glob("*.arrow")) == files


def test_the_key_follows_the_clips_and_the_window(splits) -> None:
    fe6, _, _ = audio_models.build(whisper_cfg(audio_max_seconds=6.0), 2)
    fe8, _, _ = audio_models.build(whisper_cfg(audio_max_seconds=8.0), 2)
    key = audio_data.features_key(splits["train"], fe6, RATE)
    assert key == audio_data.features_key(splits["train"], fe6, RATE)
    assert key != audio_data.features_key(splits["train"], fe8, RATE)  # another window
    assert key != audio_data.features_key(splits["train"], fe6, 4096)  # another source rate
    assert key != audio_data.features_key(splits["train"].select(range(23)), fe6, RATE)  # other clips


def test_loaders_give_the_old_order(splits, lora_exp_cache: Path) -> None:
    """The same examples in the same order as a DataLoader(batch_size) over a RandomSampler of that generator."""
    fe, _, _ = audio_models.build(whisper_cfg(audio_max_seconds=6.0), 2)
    feats = audio_data.featurize(splits, fe, RATE)
    loaders = audio_data.make_loaders(feats, 8, 5, torch.Generator().manual_seed(7))
    old = DataLoader(
        range(24), batch_size=8, sampler=RandomSampler(range(24), generator=torch.Generator().manual_seed(7))
    )
    order = [b.tolist() for b in old]
    collate = audio_data.AudioCollator(fe, RATE)
    audio = splits["train"].with_format("numpy")[:]["audio"]
    batches = list(loaders.train)
    assert len(batches) == len(loaders.train) == 3
    for batch, idx in zip(batches, order):
        assert torch.equal(batch["input_features"], collate.features([audio[i] for i in idx])["input_features"])
    assert [len(b["labels"]) for b in loaders.validation] == [5, 3] and batches[0]["labels"].dtype == torch.long


@pytest.mark.parametrize(
    "overrides",
    [("method=frozen",), ("method=lora", "lora.layers=[1]")],  # layer 0 of 2 frozen: a prefix
    ids=["frozen-encoder", "frozen-prefix"],
)
def test_cached_audio_model_gives_the_same_logits(
    lora_exp_cache: Path, tmp_path: Path, overrides: tuple[str, ...]
) -> None:
    job = job_setup.setup(make_cfg([*GW_SMALL, *overrides]), tmp_path / "run", False, timing.RssPeak())
    assert job.cache is not None and len(job.cache.store.rows) == 80  # every clip of every split
    batch = next(iter(job.loaders.validation))
    job.model.eval()
    with torch.no_grad():
        cached = job.model(**batch).logits
        job.cache.restore()
        job.model.eval()
        real = job.model(**batch).logits
    assert torch.allclose(cached, real, atol=1e-5), (cached - real).abs().max()


def test_audio_rows_are_per_clip_and_survive_reordering() -> None:
    """Clips are found by their position (row), their encoder output kept whole, in any batch order."""
    from lora_exp.training.feature_cache import VECTOR, Rows

    x = torch.from_numpy(np.random.default_rng(0).standard_normal((3, 4, 6)).astype(np.float32))
    rows = Rows({"hidden": VECTOR}, torch.zeros(3, dtype=torch.long))  # audio: no token lengths
    rows.add(torch.tensor([2, 0, 1]), {"hidden": x})  # a batch in another order than the rows
    assert len(rows.rows) == 3
    assert torch.equal(rows.gather(torch.tensor([0, 1, 2]), 0)["hidden"], x[[1, 2, 0]])
    assert torch.equal(rows.gather(torch.tensor([1, 0]), 0)["hidden"], x[[2, 1]])
