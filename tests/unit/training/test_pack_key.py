"""What a pack shares (``training.pack.base_key``): the fair sweeps' lr choice is on the adapter side, the base
side is not."""

from __future__ import annotations

from lora_exp.training.pack import base_key


def test_fair_sweep_jobs_of_every_lr_and_variant_preset_share_one_base(tiny_cfg) -> None:
    """`+sweep=fair_variants +preset=lora,rslora,dora`: lr_index, the presets' lr grids and their lora options
    differ from job to job; all of them pack together (one base side), as the issue's 18-job sweep needs."""
    jobs = [
        tiny_cfg("+sweep=fair_variants", f"+preset={preset}", f"lr_index={i}")
        for preset in ("lora", "rslora", "dora")
        for i in (0, 1, 2)
    ]
    assert len({j.optimizer.lr for j in jobs}) > 3  # the lrs really differ
    assert len({base_key(j) for j in jobs}) == 1


def test_the_base_side_still_splits_packs(tiny_cfg) -> None:
    """A different max length, batch size, method or base dtype is another base side."""
    first = base_key(tiny_cfg())
    for other in ("data.max_length=24", "trainer.batch_size=4", "method=frozen", "model.base_dtype=bf16"):
        assert base_key(tiny_cfg(other)) != first, other
