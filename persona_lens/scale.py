"""Data-parallel jobs over Ray: one model per worker, shards merged into one run's outputs.

A job that persona_lens already splits into shards runs here on ``n`` Ray actors, each holding
its own model (one engine per GPU), all writing to one ``out_dir``:

- :func:`screen`: ``screen(..., shard=(i, n))`` takes the chunks ``c`` with ``c % n == i``,
  writes one part file per chunk, and the worker that finds every chunk done writes the table.
- :func:`extract` and :func:`sweep`: ``extract(..., shard=(i, n))`` / ``sweep(..., shard=(i, n))``
  generate every ``n``-th generation batch into a log of the shard's own
  (:class:`persona_lens.store.Store`); then the first worker runs the job without a shard,
  which reads every shard's log, generates nothing of what they made, judges and finishes
  (the vectors; the sweep's table, choice and held-out re-measurement).

The merged outputs are those of a single-process run; a rerun resumes from the finished chunks
and logged generations, whichever worker made them. ``ray.init()`` starts a local Ray by
default; ``address=`` joins a cluster (then ``out_dir`` must be a filesystem every node sees).

Tensor parallelism is vLLM's own and does not combine with the engine's hooks (they live in
the engine's process): give each worker one GPU and scale out with workers (docs/scale.md).

Example (needs Ray: ``pip install "persona-lens[ray]"``):

    >>> from persona_lens import scale
    >>> result = scale.screen("persona-organism", data, vec, layers=[3], out_dir="runs/screen",
    ...                       workers=2)                                          # doctest: +SKIP
    >>> result.summary["figures"]["dP_evil_L3"]["n"]                              # doctest: +SKIP
    6
    >>> vec = scale.extract("persona-organism", "evil", judge, out_dir="runs/evil", workers=2,
    ...                     samples=2).vector                                     # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Mapping, Sequence

from persona_lens import validate as V

__all__ = ["screen", "extract", "sweep", "run_sharded", "import_ray"]

INSTALL = 'pip install "persona-lens[ray]" (or pip install ray)'


def import_ray() -> Any:
    """Import Ray, or raise an ``ImportError`` naming the install.

    Example:
        >>> try:
        ...     ray = import_ray()
        ... except ImportError as e:
        ...     assert "pip install" in str(e)
    """
    try:
        import ray
    except ImportError as e:
        raise ImportError(f"Ray jobs need Ray ({e}): {INSTALL}") from e
    return ray


class Worker:
    """One model, loaded once in a Ray actor, running the shards it is given (module level, so
    that Ray ships it by reference to workers that import persona_lens).

    Example:
        >>> w = Worker("persona-organism", {"device": "cpu"})        # doctest: +SKIP
        >>> w.run(lambda probe, shard: probe.n_layers, shard=(0, 1))  # doctest: +SKIP
        6
    """

    def __init__(self, model: str, load_kwargs: Mapping[str, Any]):
        import persona_lens as pl

        self.probe = pl.PersonaProbe(pl.load_model(model, **dict(load_kwargs)))

    def run(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        return fn(self.probe, *args, **kwargs)


def run_sharded(
    fn: Callable,
    model: str,
    n_shards: int,
    *,
    load_kwargs: Mapping[str, Any] | None = None,
    address: str | None = None,
    gpus_per_worker: float | None = None,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    finish: bool = False,
) -> list[Any]:
    """Run ``fn(probe, *args, shard=(i, n_shards), **kwargs)`` for every shard ``i``, each on a
    Ray actor of its own holding ``load_model(model, **load_kwargs)``; results in shard order.

    ``fn`` must be importable by the workers (a module-level function). Ray starts locally
    unless it is already initialised or ``address`` names a cluster. ``gpus_per_worker``
    defaults to 1 when the cluster has GPUs, else 0. With ``finish``, once every shard has
    returned, the first worker runs ``fn(probe, *args, **kwargs)`` without a shard (a job
    that reads what its shards wrote and completes, as ``extract`` and ``sweep`` do), and its
    result ends the list. A shard that fails raises its error once every other shard has
    returned.

    Example:
        >>> from persona_lens.screen import screen
        >>> parts = run_sharded(screen, "persona-organism", 2, args=(data, vec, [3]),
        ...                     kwargs=dict(out_dir="runs/screen"))              # doctest: +SKIP
    """
    n_shards = V.integer("n_shards", n_shards, min=1)
    V.text("model", str(model))
    kwargs = dict(kwargs or {})
    if "shard" in kwargs:
        raise V.InvalidArgument("shard", kwargs["shard"], "", message="Ray chooses the shards: give workers= instead")
    if not callable(fn):
        raise V.InvalidArgumentType("fn", fn, "a module-level function fn(probe, *args, shard=(i, n), **kwargs)")
    ray = import_ray()
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False, include_dashboard=False,
                 runtime_env={"env_vars": _worker_env()})
    if gpus_per_worker is None:
        gpus_per_worker = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    remote = ray.remote(Worker)
    actors = [remote.options(num_gpus=gpus_per_worker).remote(str(model), dict(load_kwargs or {}))
              for _ in range(n_shards)]
    try:
        refs = [a.run.remote(fn, *args, shard=(i, n_shards), **kwargs) for i, a in enumerate(actors)]
        # A failed shard must not cut the others short (the finally below kills them): what they
        # finish is logged, and a rerun has less to do.
        ray.wait(refs, num_returns=len(refs))
        results = ray.get(refs)
        if finish:
            results.append(ray.get(actors[0].run.remote(fn, *args, **kwargs)))
        return results
    finally:
        for a in actors:
            ray.kill(a)


def _worker_env() -> dict[str, str]:
    """What workers inherit from this process: the caches persona_lens and HF read offline."""
    keys = ("PERSONA_LENS_CACHE", "HF_HOME", "HF_HUB_OFFLINE", "OMP_NUM_THREADS", "PYTHONPATH",
            "VLLM_CPU_KVCACHE_SPACE")
    return {k: os.environ[k] for k in keys if k in os.environ}


def screen(
    model: str,
    data: Any,
    vectors: Any,
    layers: int | Sequence,
    *,
    out_dir: str | os.PathLike,
    workers: int = 2,
    engine: str = "transformer_lens",
    load_kwargs: Mapping[str, Any] | None = None,
    address: str | None = None,
    gpus_per_worker: float | None = None,
    **screen_kwargs: Any,
) -> Any:
    """:func:`persona_lens.screen` split over ``workers`` Ray actors, one model each.

    Every worker screens its shard into ``out_dir``; the worker that finishes the last chunk
    writes the table, the summary and any filtered copy, exactly as one process would. The
    returned :class:`~persona_lens.screen.ScreenResult` is read back from ``out_dir``.

    Args:
        model: what every worker loads (``load_model(model, engine=engine, **load_kwargs)``).
        data, vectors, layers, **screen_kwargs: as in :func:`persona_lens.screen` (``data``
            is read by every worker: a path they can all see, or data that pickles).
        out_dir: the run's folder, shared by the workers (a network filesystem on a cluster).
        workers: how many shards and actors.
        engine: ``"transformer_lens"`` or ``"vllm"`` (each worker boots its own engine).
        address: a Ray cluster's address (default: a local Ray).

    Example:
        >>> res = screen("persona-organism", data, vec, [3], out_dir="runs/screen", workers=2)  # doctest: +SKIP
    """
    from persona_lens.screen import screen as screen_shard

    results = _job(screen_shard, model, (data, vectors, layers), screen_kwargs, out_dir=out_dir, workers=workers,
                   engine=engine, load_kwargs=load_kwargs, address=address, gpus_per_worker=gpus_per_worker)
    # Each worker writes its parts before it looks for the others', so the last to look finds
    # every chunk done and writes the table.
    complete = [r for r in results if r.complete]
    if not complete:  # pragma: no cover - would mean a part file vanished under the run
        raise RuntimeError(f"no worker found every chunk of {out_dir} done; rerun to merge what is there")
    return complete[0]


def extract(
    model: str,
    trait: Any,
    judge: Any,
    *,
    out_dir: str | os.PathLike,
    workers: int = 2,
    engine: str = "transformer_lens",
    load_kwargs: Mapping[str, Any] | None = None,
    address: str | None = None,
    gpus_per_worker: float | None = None,
    **extract_kwargs: Any,
) -> Any:
    """:func:`persona_lens.extract` with its generations split over ``workers`` Ray actors.

    Every worker generates its shard's batches (``extract(..., shard=(i, workers))``) into a
    log of its own in ``out_dir``; then the first worker runs the extraction without a shard:
    it reads every shard's log, generates nothing they made, judges, filters and captures.
    The result is that of one process (same responses, scores, pairs and vectors); a rerun
    after a kill reuses every batch any worker logged.

    Args:
        model: what every worker loads (``load_model(model, engine=engine, **load_kwargs)``).
        trait, judge, **extract_kwargs: as in :func:`persona_lens.extract` (they are shipped
            to the workers: a judge must pickle; the trait may be a bundled name or a path the
            workers see).
        out_dir: the run's folder, shared by the workers (a network filesystem on a cluster).
        workers: how many shards and actors (one model, one GPU each).
        engine: ``"transformer_lens"`` or ``"vllm"`` (each worker boots its own engine).
        address: a Ray cluster's address (default: a local Ray).

    Returns:
        The :class:`~persona_lens.extract.ExtractionResult` of the run that finished.

    Example:
        >>> result = extract("persona-organism", "evil", judge, out_dir="runs/evil", workers=2,
        ...                  samples=2, load_kwargs={"device": "cpu"})            # doctest: +SKIP
        >>> result.stats.generated, result.stats.reused                          # doctest: +SKIP
        (0, 400)
    """
    from persona_lens.extract import extract as extract_job

    kwargs = {"progress": False, "verbose": False, **extract_kwargs}
    return _job(extract_job, model, (trait, judge), kwargs, out_dir=out_dir, workers=workers, engine=engine,
                load_kwargs=load_kwargs, address=address, gpus_per_worker=gpus_per_worker, finish=True)[-1]


def sweep(
    model: str,
    vector: Any,
    trait: Any,
    *,
    out_dir: str | os.PathLike,
    workers: int = 2,
    engine: str = "transformer_lens",
    load_kwargs: Mapping[str, Any] | None = None,
    address: str | None = None,
    gpus_per_worker: float | None = None,
    **sweep_kwargs: Any,
) -> Any:
    """:func:`persona_lens.sweep` with the grid's generations split over ``workers`` Ray actors.

    Every worker generates its shard's batches of the layer x coefficient grid
    (``sweep(..., shard=(i, workers))``) into a log of its own in ``out_dir``; then the first
    worker runs the sweep without a shard: it reads every shard's log, judges, chooses the
    cell and re-measures it on held-out answers (two cells: generated there). The table is
    that of one process; a rerun after a kill reuses every batch any worker logged.

    Args:
        model: what every worker loads (``load_model(model, engine=engine, **load_kwargs)``).
        vector, trait, **sweep_kwargs: as in :func:`persona_lens.sweep` (``layers``,
            ``coefs`` and ``judge`` among them; all are shipped to the workers).
        out_dir, workers, engine, address: as in :func:`extract`.

    Returns:
        The :class:`~persona_lens.sweep.SweepResult` of the run that finished.

    Example:
        >>> res = sweep("persona-organism", vec, "evil", layers=[3, 5], coefs=[0, 1.5], judge=judge,
        ...             out_dir="runs/evil/sweep", workers=2)                    # doctest: +SKIP
        >>> res.best_layer                                                        # doctest: +SKIP
        3
    """
    from persona_lens.sweep import sweep as sweep_job

    kwargs = {"progress": False, **sweep_kwargs}
    return _job(sweep_job, model, (vector, trait), kwargs, out_dir=out_dir, workers=workers, engine=engine,
                load_kwargs=load_kwargs, address=address, gpus_per_worker=gpus_per_worker, finish=True)[-1]


def _job(fn: Callable, model: str, args: tuple, kwargs: Mapping[str, Any], *, out_dir: Any, workers: int,
         engine: str, load_kwargs: Mapping[str, Any] | None, address: str | None,
         gpus_per_worker: float | None, finish: bool = False) -> list[Any]:
    """One job's checks and its run over Ray: ``fn`` sharded into ``out_dir`` on ``workers``
    actors with ``engine``, and (``finish``) run whole on the first once the shards are done."""
    if out_dir is None:
        raise V.InvalidArgument("out_dir", out_dir, "a folder every worker writes its shard to")
    workers = V.integer("workers", workers, min=1)
    from persona_lens.models import ENGINES

    V.choice("engine", engine, ENGINES)
    load = {**dict(V.mapping("load_kwargs", load_kwargs or {})), "engine": engine}
    kwargs = {**kwargs, "out_dir": str(out_dir), "progress": kwargs.get("progress", False)}
    return run_sharded(fn, model, workers, load_kwargs=load, address=address, gpus_per_worker=gpus_per_worker,
                       args=args, kwargs=kwargs, finish=finish)
