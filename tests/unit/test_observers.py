"""Range estimators: each is selectable by name and does what its name says."""
import pytest
import torch

from qat.observers import OBSERVERS, build_observer
from qat.primitives import choose_qparams, fake_quantize_forward
from qat.spec import QuantSpec


def heavy_tailed(n=4096, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    x[:4] = torch.tensor([40.0, -35.0, 30.0, -25.0])  # a few outliers
    return x


def test_registry_names():
    assert set(OBSERVERS) == {"minmax", "moving_average", "percentile", "mse"}


def test_minmax_accumulates_over_batches():
    obs = build_observer(QuantSpec(granularity="per_tensor"))
    obs.update(torch.tensor([-1.0, 2.0]))
    obs.update(torch.tensor([-3.0, 1.0]))
    assert float(obs.lo) == -3.0 and float(obs.hi) == 2.0


def test_moving_average_moves_by_momentum():
    obs = build_observer(QuantSpec(granularity="per_tensor", observer="moving_average", observer_args={"momentum": 0.5}))
    obs.update(torch.tensor([-2.0, 2.0]))
    obs.update(torch.tensor([-4.0, 4.0]))
    assert float(obs.hi) == 3.0 and float(obs.lo) == -3.0


def test_percentile_drops_outliers():
    x = heavy_tailed()
    obs = build_observer(QuantSpec(granularity="per_tensor", observer="percentile", observer_args={"percentile": 99.9}))
    lo, hi = obs.range_of(x)
    assert 2.0 < float(hi) < 5.0 and -5.0 < float(lo) < -2.0


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel", "per_group"])
def test_mse_search_beats_minmax_on_heavy_tails(granularity):
    spec_kw = {"bits": 4, "granularity": granularity, "group_size": 64 if granularity == "per_group" else None}
    x = heavy_tailed(8 * 512).reshape(8, 512)
    errors = {}
    for name in ("minmax", "mse"):
        spec = QuantSpec(observer=name, **spec_kw)
        lo, hi = build_observer(spec).range_of(x)
        scale, zp = choose_qparams(lo, hi, spec)
        errors[name] = float((fake_quantize_forward(x, scale, zp, spec)[0] - x).pow(2).sum())
    assert errors["mse"] < errors["minmax"]


def test_observer_state_survives_state_dict():
    spec = QuantSpec(granularity="per_channel", axis=-1, observer="minmax")
    obs = build_observer(spec)
    obs.update(torch.randn(4, 16))
    other = build_observer(spec)
    other.load_state_dict(obs.state_dict())
    assert torch.equal(other.lo, obs.lo) and other.lo.shape == (16,)
