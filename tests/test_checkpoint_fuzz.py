"""Property: a tiny checkpoint (tiny's or tiny-flux2's transformer or autoencoder) with a mutated header
(benchmarks/fuzz_checkpoints.py's mutator) is loaded or refused with a CheckpointError, never anything else; verify's OK agrees with the load
with the preset, inspect's params with the load without one. About 30 s; the long run is
`python benchmarks/fuzz_checkpoints.py --n 20000`."""

import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scripts import load_script

fuzz = load_script("fuzz_checkpoints")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict[str, bytes]:
    paths = fuzz.write_base_files(tmp_path_factory.mktemp("fuzz-base"))
    return {kind: path.read_bytes() for kind, path in paths.items()}


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rng=st.randoms(use_true_random=False), kind=st.sampled_from(fuzz.KINDS))
def test_mutated_checkpoints_load_or_raise_checkpoint_error(base, rng, kind):
    data, mutations = fuzz.mutate(base[kind], rng)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mutant.safetensors"
        path.write_bytes(data)
        result = fuzz.check(path, kind)
    assert result["error"] is None, (mutations, result["error"])
    assert result["problems"] == [], (mutations, result["problems"])


def test_the_unmutated_files_load_and_verify(base, tmp_path):
    for kind, data in base.items():
        path = tmp_path / f"{kind}.safetensors"
        path.write_bytes(data)
        result = fuzz.check(path, kind)
        assert result["outcome"] == "loaded OK" and result["problems"] == [], result
        assert result["ops"]["verify"] == "ok" and result["ops"]["inspect"] == "ok"
