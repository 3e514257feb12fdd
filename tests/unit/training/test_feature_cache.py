"""The frozen-feature cache lives on the host and finds examples by their position, never by their token ids."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lora_exp.data.text import ROW
from lora_exp.measure import timing
from lora_exp.training import feature_cache
from lora_exp.training import job as job_setup


@pytest.fixture
def frozen_job(tiny_cfg, tmp_path: Path):
    job = job_setup.setup(
        tiny_cfg("method=frozen", "trainer.precision=fp32"), tmp_path / "run", False, timing.RssPeak()
    )
    assert job.cache is not None
    return job


def test_cache_is_host_memory_outside_the_model(frozen_job) -> None:
    store = frozen_job.cache.store
    assert store.data and all(t.device.type == "cpu" for t in store.data.values())
    held = {t.untyped_storage().data_ptr() for t in store.data.values()}
    in_model = {t.untyped_storage().data_ptr() for t in (*frozen_job.model.parameters(), *frozen_job.model.buffers())}
    assert not held & in_model  # model.to(device) never moves it
    assert len(store) == sum(len(s) for s in frozen_job.encoded.values())  # one row per example of every split
    assert store.nbytes == sum(t.numel() * t.element_size() for t in store.data.values()) > 0


def test_batches_bring_their_rows_cached_outputs_along(frozen_job) -> None:
    batch = next(iter(frozen_job.loaders.train))
    assert ROW not in batch  # taken out by the collate: the model never sees it
    hidden = batch[feature_cache.PREFIX + "last_hidden_state"]
    assert hidden.device.type == "cpu" and hidden.shape[:2] == batch["input_ids"].shape
    assert (hidden[batch["attention_mask"] == 0] == 0).all()  # padding is zeros


def test_lookup_by_position_gives_the_real_encoders_logits_without_reading_token_ids(frozen_job) -> None:
    model, batch = frozen_job.model, next(iter(frozen_job.loaders.validation))
    model.eval()
    with torch.no_grad():
        cached = model(**batch).logits
        # the same batch with token ids nobody can read (meta tensors hold no data): the look-up never needs them
        blind = {**batch, "input_ids": torch.empty_like(batch["input_ids"], device="meta")}
        assert torch.equal(model(**blind).logits, cached)
        frozen_job.cache.restore()
        model.eval()
        real = model(**batch).logits  # the real encoder (the cached.* inputs are dropped by the pre-hook)
    torch.testing.assert_close(cached, real, atol=1e-5, rtol=1e-5)


def test_a_forward_without_the_batch_outputs_is_an_error(frozen_job) -> None:
    batch = {
        k: v for k, v in next(iter(frozen_job.loaders.validation)).items() if not k.startswith(feature_cache.PREFIX)
    }
    with pytest.raises(RuntimeError, match="needs the batch's cached outputs"):
        frozen_job.model(**batch)


def test_rows_gather_pads_and_orders_by_position() -> None:
    lengths = torch.tensor([2, 3, 1])
    rows = feature_cache.Rows({"h": feature_cache.SEQUENCE, "v": feature_cache.VECTOR}, lengths)
    values = {"h": torch.arange(3 * 4 * 2, dtype=torch.float).view(3, 4, 2), "v": torch.tensor([[1.0], [2.0], [3.0]])}
    rows.add(torch.tensor([2, 0, 1]), values)  # batch order differs from row order
    out = rows.gather(torch.tensor([1, 2]), 4)
    assert torch.equal(out["v"], torch.tensor([[3.0], [1.0]]))
    assert torch.equal(out["h"][0, :3], values["h"][2, :3]) and (out["h"][0, 3:] == 0).all()
    assert torch.equal(out["h"][1, :1], values["h"][0, :1]) and (out["h"][1, 1:] == 0).all()  # row 2: 1 token
