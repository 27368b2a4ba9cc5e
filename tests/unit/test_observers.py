"""Range estimators: each is selectable by name and does what its name says."""
import pytest
import torch

from qat.formats import get_format
from qat.observers import OBSERVERS, build_observer
from qat.primitives import choose_qparams, compute_range, fake_quantize_forward
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


def _block_specs():
    from qat.formats import gguf_types
    from qat.formats.fp8_block import fp8_block_spec
    from qat.formats.mxfp8 import mxfp8_spec

    specs = {name: t.spec() for name, t in gguf_types().items()}
    specs.update(MXFP8=mxfp8_spec(), FP8_BLOCK=fp8_block_spec(64))
    return specs


@pytest.mark.parametrize("name", sorted(_block_specs()))
def test_mse_searches_on_block_grids(name):
    # every GGUF block type, MX, NVFP4 and FP8 blocks: candidates are quantized on the format's own grid; ratio 1
    # (min-max) is a candidate, so a block with its own scale never does worse, and heavy tails gain
    spec = _block_specs()[name].replace(observer="mse", observer_args={"grid": 8})
    g = torch.Generator().manual_seed(1)
    x = torch.randn(128, 512, generator=g) * (1 + 9 * (torch.rand(128, 512, generator=g) > 0.995))
    errs = {}
    for label, (lo, hi) in (("minmax", compute_range(x, spec)), ("mse", build_observer(spec).range_of(x))):
        assert lo.shape == hi.shape == compute_range(x, spec)[0].shape
        scale, zp = choose_qparams(lo, hi, spec)
        errs[label] = (fake_quantize_forward(x, scale, zp, spec)[0] - x).pow(2).reshape(128, -1, spec.group_size).sum(-1)
    if name == "NVFP4":  # the global scale follows the chosen blocks: no per-block guarantee
        assert errs["mse"].sum() <= errs["minmax"].sum()
    else:  # per block, or per super-block / band where the format derives their qparams together
        shared = get_format(spec).shared_error
        assert bool((shared(errs["mse"].unsqueeze(-1), spec) <= shared(errs["minmax"].unsqueeze(-1), spec)).all())
    if name in ("Q4_0", "IQ4_NL", "IQ4_XS", "Q2_K", "TQ2_0", "NVFP4"):
        assert errs["mse"].sum() < 0.99 * errs["minmax"].sum()


@pytest.mark.parametrize("name", ["Q4_0", "Q6_K", "IQ4_XS"])
def test_percentile_on_signed_peak_formats_keeps_the_peak_sign(name):
    # these formats read lo == hi == the block's signed peak: percentile 100 is min-max exactly, lower ones shrink
    # the magnitude and keep the sign
    spec = _block_specs()[name]
    x = torch.randn(16, 256, generator=torch.Generator().manual_seed(2))
    peak = compute_range(x, spec)[0]
    for pct, check in ((100.0, lambda p: torch.equal(p, peak)),
                       (90.0, lambda p: bool((p.abs() < peak.abs()).all() and torch.equal(p.sign(), peak.sign())))):
        lo, hi = build_observer(spec.replace(observer="percentile", observer_args={"percentile": pct})).range_of(x)
        assert torch.equal(lo, hi) and check(lo)


def test_percentile_that_clips_nothing_on_the_block_size_warns_once(monkeypatch, caplog):
    """The default 99.99 keeps every block's maximum on blocks of <= 5000 values (k = round(n * p / 100) = n):
    on MXFP4's blocks of 32 it is min-max, and says so once, with the percentile that would clip."""
    import qat.observers as observers
    monkeypatch.setattr(observers, "_NO_CLIP_WARNED", set())
    spec = QuantSpec(bits=4, dtype="fp4_e2m1", granularity="per_group", group_size=32, grid="mx",
                     observer="percentile")
    x = heavy_tailed(4096).reshape(8, 512)
    with caplog.at_level("WARNING", logger="qat.observers"):
        lo, hi = build_observer(spec).range_of(x)
        build_observer(spec).range_of(x)
    assert [torch.equal(a, b) for a, b in zip((lo, hi), build_observer(spec.replace(observer="minmax")).range_of(x))] \
        == [True, True]
    assert len(caplog.records) == 1, caplog.text
    text = caplog.records[0].getMessage()
    assert "percentile=99.99 keeps the maximum of every block of 32 values" in text and "below 98.44" in text
    assert "observer_args: {percentile: 90} on that scheme in the recipe" in text  # the route that applies here
    assert "method.observer" not in text
    caplog.clear()
    with caplog.at_level("WARNING", logger="qat.observers"):
        clipped = build_observer(spec.replace(observer_args={"percentile": 90})).range_of(x)[1]
        build_observer(QuantSpec(granularity="per_tensor", observer="percentile")).range_of(heavy_tailed(8192))
    assert not caplog.records and bool((clipped <= hi).all()) and bool((clipped < hi).any())
    observers.reset_warnings()  # a new job (qat.cli.boundary.guard) warns again
    with caplog.at_level("WARNING", logger="qat.observers"):
        build_observer(spec).range_of(x)
        build_observer(spec, source="method").range_of(x)  # method.observer=percentile: its own route
    assert len(caplog.records) == 2, caplog.text
    assert "+method.observer_args.percentile=90" in caplog.records[1].getMessage()
