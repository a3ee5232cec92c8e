"""Ray data parallelism: a screen split over two local Ray workers writes what one process writes
(each worker with the default engine, or with a vLLM engine of its own; greedy base responses,
so both engines write the same texts).

Skipped without Ray (``.ci/run``'s vLLM environment has it).
"""

from __future__ import annotations

import json
import math

import pytest

import persona_lens as pl

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray", reason="Ray is not installed here; .ci/run runs this in its vLLM environment")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _same(a, b, tol: float = 1e-5) -> bool:
    """Equal; floats to float32 rounding (workers may run torch on another thread count, and
    vLLM's kernels round differently from HF's: there ``tol`` is the engine tests' 1e-4, and a
    dP, a difference of two projections, gets an absolute ``tol`` x 10)."""
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=tol, abs_tol=10 * tol)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k], tol) for k in a)
    return a == b


@pytest.mark.parametrize("engine", ["transformer_lens", "vllm"])
def test_screen_on_two_ray_workers_equals_one_process(ray_local, doctest_probe, doctest_vec, doctest_world, tmp_path,
                                                      engine):
    from persona_lens import scale

    if engine == "vllm":
        pytest.importorskip("vllm", reason="vLLM is not installed here")

    data = [c.messages for c in doctest_world.dataset(10, seed=1)]
    kwargs = dict(settings={"max_new_tokens": 16}, chunk_size=3, batch_size=4, drop_top=2, table_format="jsonl",
                  progress=False)
    one = pl.screen(doctest_probe, data, doctest_vec, layers=[2, 3], out_dir=tmp_path / "one", **kwargs)
    load = {"device": "cpu"} if engine == "transformer_lens" else {}
    two = scale.screen("persona-organism", data, doctest_vec, [2, 3], out_dir=tmp_path / "two", workers=2,
                       engine=engine, load_kwargs=load, **kwargs)
    assert two.complete and one.complete
    rows_one, rows_two = one.rows(), two.rows()
    assert len(rows_two) == len(rows_one) == 10
    tol = 1e-5 if engine == "transformer_lens" else 1e-4
    for a, b in zip(rows_one, rows_two):
        assert a.keys() == b.keys() and all(_same(a[k], b[k], tol) for k in a), \
            [(k, a[k], b[k]) for k in a if not _same(a[k], b[k], tol)]
    assert two.dropped == one.dropped
    assert _same(json.loads((tmp_path / "two" / "summary.json").read_text())["figures"],
                 json.loads((tmp_path / "one" / "summary.json").read_text())["figures"], tol)
    # Both workers did part of the work: each chunk's base responses are in their own log.
    assert len(list((tmp_path / "two" / "base").glob("*.jsonl"))) == 4
    # A rerun resumes: every chunk is done, nothing is generated again.
    again = scale.screen("persona-organism", data, doctest_vec, [2, 3], out_dir=tmp_path / "two", workers=2,
                         engine=engine, load_kwargs=load, **kwargs)
    assert again.generated == 0 and again.complete
