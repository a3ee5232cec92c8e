"""Data-parallel jobs over Ray: one model per worker, shards merged into one run's outputs.

A job that persona_lens already splits into shards (data screening: ``screen(..., shard=(i, n))``
takes the chunks ``c`` with ``c % n == i``, writes one part file per chunk, and the run that
finds every chunk done writes the table) runs here on ``n`` Ray actors, each holding its own
model (one engine per GPU), all writing to one ``out_dir``. The merged outputs are those of a
single-process run; a rerun resumes from the finished chunks and logged generations, whichever
worker made them. ``ray.init()`` starts a local Ray by default; ``address=`` joins a cluster
(then ``out_dir`` must be a filesystem every node sees).

Tensor parallelism is vLLM's own and does not combine with the engine's hooks (they live in
the engine's process): give each worker one GPU and scale out with workers (docs/scale.md).

Example (needs Ray: ``pip install "persona-lens[ray]"``):

    >>> from persona_lens import scale
    >>> result = scale.screen("persona-organism", data, vec, layers=[3], out_dir="runs/screen",
    ...                       workers=2)                                          # doctest: +SKIP
    >>> result.summary["figures"]["dP_evil_L3"]["n"]                              # doctest: +SKIP
    6
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Sequence

from persona_lens import validate as V

__all__ = ["screen", "run_sharded", "import_ray"]

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
) -> list[Any]:
    """Run ``fn(probe, *args, shard=(i, n_shards), **kwargs)`` for every shard ``i``, each on a
    Ray actor of its own holding ``load_model(model, **load_kwargs)``; results in shard order.

    ``fn`` must be importable by the workers (a module-level function). Ray starts locally
    unless it is already initialised or ``address`` names a cluster. ``gpus_per_worker``
    defaults to 1 when the cluster has GPUs, else 0.

    Example:
        >>> from persona_lens.screen import screen
        >>> parts = run_sharded(screen, "persona-organism", 2, args=(data, vec, [3]),
        ...                     kwargs=dict(out_dir="runs/screen"))              # doctest: +SKIP
    """
    ray = import_ray()
    n_shards = V.integer("n_shards", n_shards, min=1)
    V.text("model", str(model))
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False, include_dashboard=False,
                 runtime_env={"env_vars": _worker_env()})
    if gpus_per_worker is None:
        gpus_per_worker = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    remote = ray.remote(Worker)
    actors = [remote.options(num_gpus=gpus_per_worker).remote(str(model), dict(load_kwargs or {}))
              for _ in range(n_shards)]
    try:
        return ray.get([a.run.remote(fn, *args, shard=(i, n_shards), **dict(kwargs or {}))
                        for i, a in enumerate(actors)])
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

    if out_dir is None:
        raise V.InvalidArgument("out_dir", out_dir, "a folder every worker writes its shard to")
    if "shard" in screen_kwargs:
        raise V.InvalidArgument("shard", screen_kwargs["shard"], "", message="Ray chooses the shards: give workers= instead")
    workers = V.integer("workers", workers, min=1)
    load = {**dict(load_kwargs or {}), "engine": engine}
    kwargs = {**screen_kwargs, "out_dir": str(out_dir), "progress": screen_kwargs.get("progress", False)}
    results = run_sharded(screen_shard, model, workers, load_kwargs=load, address=address,
                          gpus_per_worker=gpus_per_worker, args=(data, vectors, layers), kwargs=kwargs)
    # Each worker writes its parts before it looks for the others', so the last to look finds
    # every chunk done and writes the table.
    complete = [r for r in results if r.complete]
    if not complete:  # pragma: no cover - would mean a part file vanished under the run
        raise RuntimeError(f"no worker found every chunk of {out_dir} done; rerun to merge what is there")
    return complete[0]
