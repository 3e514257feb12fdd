"""The synthetic GW generator: deterministic per seed, cached once, positives at the SNR asked for."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lora_exp.data import gw as gw_data
from lora_exp.data.gw import GwOptions
from lora_exp.errors import LoraExpError

SMALL = GwOptions(n_train=16, n_validation=8, n_test=8)

pytestmark = pytest.mark.usefixtures("lora_exp_cache")  # generated data goes to a temporary cache


def test_simulate_is_deterministic_per_seed() -> None:
    a, b, c = gw_data.simulate(SMALL, 6, 1), gw_data.simulate(SMALL, 6, 1), gw_data.simulate(SMALL, 6, 2)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.allclose(a["strain"], c["strain"])
    assert a["strain"].shape == (6, 3, 4096) and a["strain"].dtype == np.float32


def test_positives_have_the_snr_asked_for() -> None:
    """Matched filter with the injected (whitened) template, averaged over positives, gives the target SNR
    within 10%; the template's own norm (optimal SNR in whitened units) within 1%."""
    o = GwOptions(snr=(8.0, 16.0))
    sim = gw_data.simulate(o, 80, seed=5)
    pos = sim["label"] == 1
    x, h, snr = sim["strain"][pos], sim["template"][pos].astype(np.float64), sim["snr"][pos]
    assert pos.sum() == 40 and ((snr >= 8.0) & (snr <= 16.0)).all()
    norm = np.sqrt((h**2).sum(axis=(1, 2)))
    np.testing.assert_allclose(norm, snr, rtol=0.01)
    matched = (x * h).sum(axis=(1, 2)) / norm  # <data, template> / |template|: mean = optimal SNR
    assert abs(matched.mean() / snr.mean() - 1) < 0.10
    noise = sim["strain"][~pos]
    assert noise.std() == pytest.approx(np.sqrt(980 / 1024), rel=0.05)  # unit variance in the kept band
    assert np.abs((noise * h[: len(noise)]).sum(axis=(1, 2)) / norm[: len(noise)]).mean() < 2.0


def test_noise_is_coloured_before_whitening() -> None:
    """The aLIGO-like PSD falls steeply to a bucket near 200 Hz and rises above it."""
    f = np.array([20.0, 200.0, 1000.0])
    s = gw_data.aligo_psd(f)
    assert s[0] > 10 * s[1] and s[2] > 2 * s[1]


def test_generated_once_into_the_cache_keyed_by_options(lora_exp_cache: Path) -> None:
    first = gw_data.load(SMALL)
    folder = lora_exp_cache / "gw" / SMALL.key()
    stamp = (folder / "train.npz").stat().st_mtime_ns
    again = gw_data.load(SMALL)
    assert (folder / "train.npz").stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(first["test"]["strain"], again["test"]["strain"])
    assert {s: len(first[s]["label"]) for s in gw_data.SPLITS} == {"train": 16, "validation": 8, "test": 8}
    other = GwOptions(n_train=16, n_validation=8, n_test=8, seed=1)
    assert other.key() != SMALL.key()
    # one split's size does not change the others' content
    bigger = gw_data.load(GwOptions(n_train=20, n_validation=8, n_test=8))
    np.testing.assert_array_equal(bigger["validation"]["strain"], first["validation"]["strain"])


def test_as_splits_maps_detectors_to_one_channel() -> None:
    splits = gw_data.as_splits(SMALL)
    row = splits["train"].with_format("numpy")[0]
    assert row["audio"].shape == (3 * 4096,)
    raw = gw_data.load(SMALL)["train"]["strain"][0]
    np.testing.assert_array_equal(row["audio"], raw.reshape(-1))
    summed = gw_data.to_audio(raw[None], "sum")[0]
    np.testing.assert_allclose(summed, raw.sum(0) / np.sqrt(3), rtol=1e-6)
    assert splits["train"].features["label"].names == ["noise", "signal"]
    assert GwOptions(mapping="sum").clip_seconds() == 2.0 and SMALL.clip_seconds() == 6.0


def test_bad_options_are_one_line_each() -> None:
    bad = GwOptions(snr=(10.0, 5.0), mapping="stack", detectors=("H1", "K1"))
    errors = gw_data.check(bad)
    assert len(errors) == 3
    assert any(e.startswith("data.gw.snr=") for e in errors) and any("data.gw.mapping=" in e for e in errors)
    with pytest.raises(LoraExpError, match="data.gw.detectors"):
        gw_data.generate(bad)
