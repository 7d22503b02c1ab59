"""A misspelled keyword argument gets the argument meant, not Python's bare TypeError."""

from __future__ import annotations

import inspect

import pytest

from lightning_gns import (
    AdaptiveBatchSize,
    CriticalBatchProbe,
    GradientNoiseMeter,
    GradientNoiseScale,
)


@pytest.mark.parametrize(
    "cls, kwargs, meant",
    [
        (GradientNoiseScale, {"ema": 2}, "did you mean 'ema_decay'?"),
        (GradientNoiseScale, {"batch_multiple": 8}, "did you mean 'batch_size_multiple'?"),
        (GradientNoiseScale, {"sourse": "auto"}, "did you mean 'source'?"),
        (AdaptiveBatchSize, {"max_accum": 8}, "did you mean 'max_accumulate'?"),
        (AdaptiveBatchSize, {"lr_scale": "auto"}, "did you mean 'lr_scaling'?"),
        (CriticalBatchProbe, {"every_n_step": 5}, "did you mean 'every_n_steps'?"),
        (CriticalBatchProbe, {"at_step": [5]}, "did you mean 'at_steps'?"),
        (GradientNoiseMeter, {"accumulation": 2}, "did you mean 'accumulate'?"),
        (GradientNoiseMeter, {"log_every": 5}, "did you mean 'log_every_n_steps'?"),
    ],
)
def test_a_misspelled_argument_names_the_one_meant(cls: type, kwargs: dict, meant: str) -> None:
    (key,) = kwargs
    with pytest.raises(TypeError, match=f"unexpected keyword argument '{key}'; {meant}"):
        cls(**kwargs)


def test_without_a_close_name_it_lists_the_arguments_and_the_signature_stays() -> None:
    with pytest.raises(TypeError, match="'zzz'; it takes ema_decay, source, layers"):
        GradientNoiseScale(zzz=1)
    assert list(inspect.signature(GradientNoiseScale).parameters)[0] == "ema_decay"  # CLI, docs
    assert GradientNoiseScale(ema_decay=0.9).ema_decay == 0.9

    class Mine(GradientNoiseScale):  # a subclass that passes the rest on checks nothing
        def __init__(self, extra: int = 0, **rest: object) -> None:
            super().__init__(**rest)  # type: ignore[arg-type]

    assert Mine(extra=1, ema_decay=0.5).ema_decay == 0.5
