"""A seeded fuzz of every loader: each corrupted export either loads as the very same model or is refused with a
BadFileError naming the file (never another exception, never a different model). scripts/fuzz_loaders.py runs
thousands of cases in subprocesses under a memory cap."""
from __future__ import annotations

import collections
import logging

import pytest

from tests.export import fuzz

CASES = 200


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    paths = fuzz.make_exports(tmp_path_factory.mktemp("fuzz-src"))
    return paths, fuzz.reference_logits(paths)


@pytest.mark.parametrize("fmt", fuzz.FORMATS)
def test_corrupted_exports_load_identically_or_are_refused(exports, tmp_path, fmt, caplog):
    caplog.set_level(logging.ERROR)
    paths, reference = exports
    rng = fuzz.seeded(1234 + fuzz.FORMATS.index(fmt))
    kinds = fuzz.kinds(fmt)
    seen, bad = collections.Counter(), []
    for i in range(CASES):
        kind = kinds[i % len(kinds)]
        dst = tmp_path / str(i) / ("m.gguf" if fmt == "gguf" else "x")
        dst.parent.mkdir()
        fuzz.mutate(fmt, kind, paths[fmt], dst, rng)
        result = fuzz.outcome(dst, reference[fmt])
        seen[result.split(":")[0]] += 1
        if result not in ("refused", "identical"):
            bad.append(f"{kind}: {result}")
    assert not bad, "\n".join(bad)
    assert seen["refused"] > CASES // 2  # the mutations do corrupt the files
