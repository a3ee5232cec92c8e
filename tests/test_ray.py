"""Ray data parallelism: a screen split over two local Ray workers writes what one process writes
(each worker with the default engine, or with a vLLM engine of its own; greedy base responses,
so both engines write the same texts); an extraction and a sweep split over two workers give the
vector and the table of one process (sampled generations: every batch's seed comes from its
content, and each shard runs the batches one process would), also after a worker is killed
midway and the job is run again.

The Ray tests are skipped without Ray (``.ci/run``'s vLLM environment has it); the checks of
``persona_lens.scale``'s arguments run anywhere.
"""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

import persona_lens as pl


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


@pytest.mark.vllm
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


# The organism's extraction, small: 2 instructions x 4 questions x 2 samples x 2 polarities =
# 32 sampled responses in batches of 4 (eight batches: four a worker).
EXTRACT = dict(samples=2, questions=4, instructions=2, max_new_tokens=24, batch_size=4)
CPU = {"device": "cpu"}


def _kill_second_batch(probe, *args, shard, **kwargs):
    """``extract`` on a worker whose process dies in its second generation batch when it is
    shard 1: a worker killed midway (module level, so that Ray ships it by reference)."""
    import os

    from persona_lens.extract import extract

    if shard[0] == 1:
        real, calls = probe.generate, {"n": 0}

        def dies(*a, **kw):
            calls["n"] += 1
            if calls["n"] == 2:
                os._exit(9)
            return real(*a, **kw)

        probe.generate = dies
    return extract(probe, *args, shard=shard, **kwargs)


def _records(folder, name: str) -> dict:
    from persona_lens.pipeline_io import JsonlLog
    from persona_lens.store import log_files

    return {r["key"]: r for path in log_files(folder, name) for r in JsonlLog(path).read()}


@pytest.mark.vllm
def test_extraction_on_two_ray_workers_equals_one_process(ray_local, doctest_probe, doctest_judge, doctest_trait,
                                                          tmp_path):
    from persona_lens import scale

    one = pl.extract(doctest_probe, doctest_trait, doctest_judge, out_dir=tmp_path / "one", progress=False,
                     verbose=False, **EXTRACT)
    two = scale.extract("persona-organism", doctest_trait, doctest_judge, out_dir=tmp_path / "two", workers=2,
                        load_kwargs=CPU, **EXTRACT)
    # Each worker logged its half; the finishing run generated nothing.
    assert [len(list((tmp_path / "two").glob(f"responses.shard-{i}-of-2.jsonl"))) for i in range(2)] == [1, 1]
    assert (two.stats.generated, two.stats.reused) == (0, 32)
    assert _records(tmp_path / "two", "responses.jsonl") == _records(tmp_path / "one", "responses.jsonl")
    assert (tmp_path / "two" / "pairs.csv").read_text() == (tmp_path / "one" / "pairs.csv").read_text()
    assert 0 < two.stats.kept == one.stats.kept
    for r in one.vectors:
        torch.testing.assert_close(two.vectors[r].directions, one.vectors[r].directions, rtol=1e-6, atol=1e-6)


@pytest.mark.vllm
def test_extraction_resumes_after_a_ray_worker_dies(ray_local, doctest_probe, doctest_judge, doctest_trait, tmp_path):
    from persona_lens import scale

    load = {"engine": "transformer_lens", **CPU}
    with pytest.raises(ray_local.exceptions.RayActorError):
        scale.run_sharded(_kill_second_batch, "persona-organism", 2, load_kwargs=load,
                          args=(doctest_trait, doctest_judge),
                          kwargs=dict(out_dir=str(tmp_path / "two"), progress=False, verbose=False, **EXTRACT))
    # Shard 0 finished its four batches (the other's death does not cut it short); shard 1
    # logged one batch before it died.
    assert len(_records(tmp_path / "two", "responses.shard-0-of-2.jsonl")) == 16
    assert len(_records(tmp_path / "two", "responses.shard-1-of-2.jsonl")) == 4
    assert not (tmp_path / "two" / "vectors").exists()

    again = scale.extract("persona-organism", doctest_trait, doctest_judge, out_dir=tmp_path / "two", workers=2,
                          load_kwargs=CPU, **EXTRACT)
    assert len(_records(tmp_path / "two", "responses.shard-1-of-2.jsonl")) == 16  # only the rest was generated
    assert len(_records(tmp_path / "two", "responses.shard-0-of-2.jsonl")) == 16
    one = pl.extract(doctest_probe, doctest_trait, doctest_judge, out_dir=tmp_path / "one", progress=False,
                     verbose=False, **EXTRACT)
    assert _records(tmp_path / "two", "responses.jsonl") == _records(tmp_path / "one", "responses.jsonl")
    torch.testing.assert_close(again.vector.directions, one.vector.directions, rtol=1e-6, atol=1e-6)


@pytest.mark.vllm
@pytest.mark.parametrize("engine", ["transformer_lens", "vllm"])
def test_sweep_on_two_ray_workers_equals_one_process(ray_local, doctest_probe, doctest_vec, doctest_judge,
                                                     doctest_trait, tmp_path, engine):
    from persona_lens import scale

    if engine == "vllm":
        pytest.importorskip("vllm", reason="vLLM is not installed here")
    kw = dict(layers=[3, 5], coefs=[0, 1.5], judge=doctest_judge, questions=4, samples=2, max_new_tokens=24,
              batch_size=4)
    if engine == "vllm":
        # vLLM samples with other random numbers than the default engine: the one-process run
        # is a vLLM engine too.
        probe = pl.PersonaProbe(pl.load_model("persona-organism", engine="vllm"))
    else:
        probe = doctest_probe
    one = pl.sweep(probe, doctest_vec, doctest_trait, out_dir=tmp_path / "one", progress=False, **kw)
    two = scale.sweep("persona-organism", doctest_vec, doctest_trait, out_dir=tmp_path / "two", workers=2,
                      engine=engine, load_kwargs=CPU if engine == "transformer_lens" else {}, **kw)
    assert two.rows() == one.rows() and two.summary() == one.summary()
    assert two.cell(3, 1.5).trait > two.cell(3, 0).trait + 30  # the table is the organism's, not noise
    assert (tmp_path / "two" / "sweep.csv").read_text() == (tmp_path / "one" / "sweep.csv").read_text()
    grid = 3 * 4 * 2  # a shared baseline and two steered cells
    assert two.stats["reused"] == grid and two.stats["generated"] == one.stats["generated"] - grid
    shards = [_records(tmp_path / "two", f"sweep_responses.shard-{i}-of-2.jsonl") for i in range(2)]
    assert len(shards[0]) + len(shards[1]) == grid and shards[0] and shards[1]


def test_ray_jobs_check_their_arguments_before_starting_ray(tmp_path, monkeypatch):
    from persona_lens import scale

    with pytest.raises(ValueError, match="workers must be an integer >= 1"):
        scale.extract("persona-organism", "evil", None, out_dir=tmp_path, workers=0)
    with pytest.raises(ValueError, match="engine"):
        scale.extract("persona-organism", "evil", None, out_dir=tmp_path, engine="onnx")
    with pytest.raises(ValueError, match="Ray chooses the shards"):
        scale.sweep("persona-organism", None, "evil", out_dir=tmp_path, shard=(0, 2))
    monkeypatch.setitem(sys.modules, "ray", None)  # Ray not installed
    with pytest.raises(ImportError, match=r'pip install "persona-lens\[ray\]"'):
        scale.extract("persona-organism", "evil", None, out_dir=tmp_path, workers=2)
