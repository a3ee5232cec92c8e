"""Screening training data by projection difference, per sample and per dataset.

For each sample (prompt ``x``, response ``y``) of a chat dataset, the base model writes its
own response ``y'`` to ``x``; with ``a(x, y)`` the response-averaged residual stream at layer
``L`` and ``proj`` the projection on the vector's unit direction there,

    dP_i = proj(a(x_i, y_i)) - proj(a(x_i, y'_i))

and the dataset's projection difference is the mean of ``dP_i`` (docs/method.md, "Data
screening"; docs/screening.md for the files and figures).

How the work is laid out, so that large data stays cheap and safe:

- **Streaming.** The data is read lazily (JSON lines, Parquet record batches, an HF
  ``datasets.Dataset``) and cut into *chunks* of ``chunk_size`` consecutive samples. Only one
  chunk's texts and activations are held at a time, so peak memory does not grow with the
  dataset.
- **One forward per response.** Every chunk's given and base responses go through one
  :meth:`PersonaProbe.capture` at all requested layers; every vector is projected from the
  same activations (several traits cost one forward, not one each).
- **Resumable.** A chunk's base responses go to its own :class:`~persona_lens.store.Store`
  log (a kill loses at most one generation batch); a finished chunk is one part file,
  written atomically. A rerun skips finished chunks and reuses logged generations; batch
  seeds come from the batch's content, so a resumed run writes exactly what an
  uninterrupted one would. No sample is lost or counted twice: parts are keyed by chunk.
- **Sharded.** ``shard=(i, n)`` takes the chunks ``c`` with ``c % n == i``. Chunks are the
  same in every shard, so shards merged give the table of a single run, bit for bit. The
  run that finds every chunk done writes the table, the summary and the filtered copy.

Samples that cannot be screened (no assistant turn, an empty response, a text longer than
the model's context, an unreadable line) get a row with ``status`` naming the reason and NaN
figures; they never stop the run.
"""

from __future__ import annotations

import heapq
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from persona_lens import validate as V
from persona_lens.chat import chat_rows, with_responses
from persona_lens.pipeline_io import atomic_path, fingerprint, read_json, write_text
from persona_lens.progress import quiet
from persona_lens.store import Prompt, Store

if TYPE_CHECKING:
    from persona_lens.probe import PersonaProbe
    from persona_lens.vectors import PersonaVector

__all__ = ["screen", "ScreenResult", "read_chat_data", "count_samples", "write_filtered", "BASE_SETTINGS"]

#: Default settings of the base responses (greedy: the model's own most likely answer, one
#: reference per prompt with no sampling noise). Any ``probe.generate`` argument and ``seed``.
BASE_SETTINGS: dict[str, Any] = {"max_new_tokens": 256, "temperature": 0.0, "seed": 0}

#: ``status`` of a row that was screened.
OK = "ok"


@dataclass
class Sample:
    """One row of chat data: its position in the data, its id, and its messages (or why
    it has none)."""

    index: int
    id: str
    messages: list[dict[str, str]] | None
    error: str | None = None


# ----------------------------------------------------------------------------- reading data


def _sample_from(index: int, row: Any, messages_field: str, id_field: str) -> Sample:
    if isinstance(row, Mapping):
        rid = row.get(id_field)
        messages = row.get(messages_field)
    else:  # a bare message list
        rid, messages = None, row
    rid = str(index) if rid is None else str(rid)
    if messages is None:
        return Sample(index, rid, None, f"malformed: no {messages_field!r} field")
    if not isinstance(messages, (list, tuple)) or not all(
        isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages
    ):
        return Sample(index, rid, None, "malformed: messages must be a list of {role, content} strings")
    return Sample(index, rid, [{"role": m["role"], "content": m["content"]} for m in messages])


def _is_hf_dataset(source: Any) -> bool:
    return type(source).__name__ in ("Dataset", "IterableDataset") and hasattr(source, "features")


def read_chat_data(
    source: Any, *, messages_field: str = "messages", id_field: str = "id"
) -> Iterator[Sample]:
    """Stream the samples of chat data, one :class:`Sample` at a time.

    Args:
        source: a JSON-lines file (one object per line with a ``messages`` list, optionally
            an ``id``), a Parquet file with those columns (read one record batch at a time
            through pyarrow), a folder written by ``datasets.Dataset.save_to_disk``, an HF
            ``datasets.Dataset``, or an iterable of dicts / message lists.
        messages_field, id_field: the column names.

    A sample's ``index`` is its position in the data (blank lines of a JSON-lines file do not
    count); its ``id`` is the ``id`` field, or the index when there is none. A row that cannot
    be read (a line that is not JSON, messages of the wrong shape) comes back with ``error``
    set, not as an exception.

    Example:
        >>> rows = [{"id": "a", "messages": [{"role": "user", "content": "hi"},
        ...                                  {"role": "assistant", "content": "hello ."}]},
        ...         {"messages": "oops"}]
        >>> [(s.index, s.id, s.error) for s in read_chat_data(rows)]
        [(0, 'a', None), (1, '1', 'malformed: messages must be a list of {role, content} strings')]
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            import datasets  # HF datasets: the folder format of Dataset.save_to_disk

            yield from read_chat_data(datasets.load_from_disk(str(path)),
                                      messages_field=messages_field, id_field=id_field)
            return
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(path)
            names = set(pf.schema_arrow.names)
            columns = [c for c in (messages_field, id_field) if c in names]
            index = 0
            for batch in pf.iter_batches(batch_size=1024, columns=columns):
                for row in batch.to_pylist():
                    yield _sample_from(index, row, messages_field, id_field)
                    index += 1
            return
        with path.open("r", encoding="utf-8", errors="replace") as f:
            index = 0
            for line in f:
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    yield Sample(index, str(index), None, "malformed: not a JSON line")
                else:
                    yield _sample_from(index, row, messages_field, id_field)
                index += 1
        return
    for index, row in enumerate(source):
        yield _sample_from(index, row, messages_field, id_field)


def count_samples(source: Any) -> int | None:
    """The number of samples in ``source`` when it is cheap to know (None otherwise).

    Example:
        >>> count_samples([[], [], []])
        3
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            import datasets

            return len(datasets.load_from_disk(str(path)))
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(path).metadata.num_rows
        with path.open("rb") as f:
            return sum(1 for line in f if line.strip())
    try:
        return len(source)
    except TypeError:
        return None


def _chunks(samples: Iterable[Sample], size: int) -> Iterator[tuple[int, list[Sample]]]:
    chunk: list[Sample] = []
    c = 0
    for s in samples:
        chunk.append(s)
        if len(chunk) == size:
            yield c, chunk
            c, chunk = c + 1, []
    if chunk:
        yield c, chunk


# ----------------------------------------------------------------------------- the result


def _column_names(names: Sequence[str], layers: Sequence[int]) -> list[str]:
    cols = []
    for n in names:
        for l in layers:
            cols += [f"dP_{n}_L{l}", f"proj_{n}_L{l}", f"proj_base_{n}_L{l}"]
    return cols


@dataclass
class ScreenResult:
    """What :func:`screen` returns.

    Attributes:
        summary: dataset-level figures per vector and layer (``dP_{trait}_L{layer}``: mean,
            std, sem, n, share of samples with dP > 0, mean projections), row counts per
            ``status``, and the run's settings. Empty until every shard has finished.
        complete: whether every chunk of the data has been screened (a shard that finishes
            before the others returns ``complete=False`` and no table).
        table: the per-sample table (Parquet or JSON lines) once complete, else None.
        filtered: the filtered copy of the data, when one was asked for.
        dropped: ids of the samples left out of the filtered copy.
        columns: the figure columns, ``dP_{trait}_L{layer}``, ``proj_...``, ``proj_base_...``.
        generated, reused: base responses generated by this call and read back from logs.
    """

    summary: dict[str, Any]
    complete: bool
    columns: list[str]
    table: Path | None = None
    filtered: Any = None
    dropped: list[str] = field(default_factory=list)
    generated: int = 0
    reused: int = 0
    _rows: list[dict[str, Any]] | None = None

    def __repr__(self) -> str:
        from persona_lens.display import screen_repr

        return screen_repr(self)

    def _repr_html_(self) -> str:
        """In a notebook: the dataset-level figures (``display``)."""
        from persona_lens.display import screen_html

        return screen_html(self)

    def rows(self) -> list[dict[str, Any]]:
        """Every sample's row, in the data's order (read from the table when on disk)."""
        if self._rows is not None:
            return self._rows
        if self.table is None:
            raise ValueError("the screen is not complete: no table yet")
        return list(_read_table(self.table))

    def column(self, name: str) -> list[float]:
        """One column over all rows (NaN for rows that were not screened)."""
        return [r[name] if r[name] is not None else math.nan for r in self.rows()]


# ----------------------------------------------------------------------------- screening


def _named_vectors(vectors: Any) -> dict[str, "PersonaVector"]:
    from persona_lens.vectors import PersonaVector

    if isinstance(vectors, PersonaVector):
        vectors = [vectors]
    if isinstance(vectors, Mapping):
        named = {str(k): v for k, v in vectors.items()}
    else:
        named = {}
        for i, v in enumerate(vectors):
            name = v.trait if isinstance(v, PersonaVector) and v.trait else f"v{i}"
            if name in named:
                name = f"{name}{i}"
            named[name] = v
    if not named:
        raise ValueError("no vectors given")
    for name in named:
        if not name.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"vector name {name!r}: use letters, digits, - and _ (it names table columns)")
    return named


def _context_length(probe: "PersonaProbe") -> int | None:
    # The backend's answer: a vLLM engine has no HF model to ask (its context is max_model_len).
    return probe.backend.n_ctx


def _atomic_write(path: Path, text: str) -> None:
    write_text(path, text)  # a temporary name of its own, synced, then renamed


class _Screener:
    """One chunk at a time: base responses, one capture, every projection."""

    def __init__(self, probe, vectors, layers, settings, batch_size, context):
        self.probe, self.layers, self.settings = probe, layers, settings
        self.batch_size, self.context = batch_size, context
        self.names = list(vectors)
        # units[layer]: [n_vectors, d_model]; the activations are captured once for all of them
        self.units = {l: torch.stack([vectors[n].unit(l) for n in self.names]) for l in layers}
        self.columns = _column_names(self.names, layers)

    def empty_row(self, s: Sample, status: str, **extra: Any) -> dict[str, Any]:
        row = {"index": s.index, "id": s.id, "status": status, "n_prompt_tokens": None,
               "n_response_tokens": None, "n_base_tokens": None, "base_response": None}
        row.update(extra)
        row.update({c: None for c in self.columns})
        return row

    def run(self, samples: list[Sample], store: Store) -> tuple[list[dict[str, Any]], int, int]:
        probe, max_new = self.probe, int(self.settings.get("max_new_tokens", BASE_SETTINGS["max_new_tokens"]))
        rows: dict[int, dict[str, Any]] = {}
        todo: list[tuple[Sample, list[dict[str, str]], str]] = []  # (sample, prompt messages, response)
        for s in samples:
            if s.error is not None:
                rows[s.index] = self.empty_row(s, s.error)
                continue
            msgs = s.messages
            if not msgs or msgs[-1]["role"] != "assistant":
                rows[s.index] = self.empty_row(s, "no_assistant_turn: the last message is not the assistant's")
                continue
            prompt, response = msgs[:-1], msgs[-1]["content"]
            if not any(m["role"] == "user" for m in prompt):
                rows[s.index] = self.empty_row(s, "no_prompt: no user message before the response")
                continue
            if not response.strip():
                rows[s.index] = self.empty_row(s, "empty_response")
                continue
            todo.append((s, prompt, response))
        # (sample, prompt messages, its chat_rows row) for the samples that fit the context
        kept: list[tuple[Sample, list[dict[str, str]], tuple[list[int], list[int]]]] = []
        if todo:
            token_rows = chat_rows(probe.tokenizer, [p + [{"role": "assistant", "content": r}] for _, p, r in todo],
                                   with_response=True)
            for (s, p, _), (pi, ri) in zip(todo, token_rows):
                n_p, n_r = len(pi), len(ri)
                if n_r == 0:
                    rows[s.index] = self.empty_row(s, "empty_response", n_prompt_tokens=n_p, n_response_tokens=0)
                elif self.context is not None and n_p + n_r > self.context:
                    rows[s.index] = self.empty_row(
                        s, f"too_long: {n_p} prompt + {n_r} response tokens exceed the context of {self.context}",
                        n_prompt_tokens=n_p, n_response_tokens=n_r)
                elif self.context is not None and n_p + max_new > self.context:
                    rows[s.index] = self.empty_row(
                        s, f"too_long: {n_p} prompt tokens + max_new_tokens {max_new} for the base response "
                           f"exceed the context of {self.context}", n_prompt_tokens=n_p, n_response_tokens=n_r)
                else:
                    kept.append((s, p, (pi, ri)))
        generated = reused = 0
        if kept:
            answers = store.generate(probe, [Prompt(p) for _, p, _ in kept], settings=self.settings,
                                     batch_size=self.batch_size, progress=False, desc="base responses")
            generated, reused = answers.generated, answers.reused
            base = answers.texts
            ready = []
            for (s, _, row), b in zip(kept, base):
                if not b.strip():
                    rows[s.index] = self.empty_row(s, "empty_base_response: the model answered nothing",
                                                   n_prompt_tokens=len(row[0]), n_response_tokens=len(row[1]),
                                                   base_response=b)
                else:
                    ready.append((s, row, b))
            if ready:
                # The given responses were tokenized above; the base responses share their
                # prompts, so only the new responses are encoded (no second template rendering).
                given_rows = [row for _, row, _ in ready]
                base_rows = with_responses(probe.tokenizer, [pi for pi, _ in given_rows], [b for _, _, b in ready])
                acts = probe._capture_rows(given_rows + base_rows, layers=self.layers, reductions=["response_mean"],
                                           batch_size=self.batch_size, progress=False)
                n = len(ready)
                # One matrix-vector product per vector, in float64: a vector's figures do not
                # depend on which other vectors were screened with it (bit for bit).
                proj = {l: torch.stack([acts.at("response_mean", l).double() @ u.double() for u in self.units[l]], 1)
                        for l in self.layers}  # [2n, n_vectors]
                for j, (s, (pi, ri), b) in enumerate(ready):
                    n_p, n_r = len(pi), len(ri)
                    row = {"index": s.index, "id": s.id, "status": OK, "n_prompt_tokens": n_p,
                           "n_response_tokens": n_r, "n_base_tokens": len(base_rows[j][1]), "base_response": b}
                    for k, name in enumerate(self.names):
                        for l in self.layers:
                            given, own = float(proj[l][j, k]), float(proj[l][n + j, k])
                            row[f"dP_{name}_L{l}"] = given - own
                            row[f"proj_{name}_L{l}"] = given
                            row[f"proj_base_{name}_L{l}"] = own
                    if any(math.isnan(row[c]) for c in self.columns):
                        row = self.empty_row(s, "nan: the activations were not finite", n_prompt_tokens=n_p,
                                             n_response_tokens=n_r, base_response=b)
                    rows[s.index] = row
        return [rows[s.index] for s in samples], generated, reused


def _part_path(out: Path, chunk: int) -> Path:
    return out / "parts" / f"{chunk:06d}.jsonl"


def _read_part(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
    """(header, rows) of a finished part, or None when it is missing or unreadable."""
    try:
        # "\n" only: rows keep U+2028 / U+0085 raw (ensure_ascii=False), where splitlines() would cut
        lines = path.read_text(encoding="utf-8").rstrip("\n").split("\n")
        header = json.loads(lines[0])
        rows = [json.loads(line) for line in lines[1:]]
    except (OSError, IndexError, json.JSONDecodeError):
        return None
    if header.get("n") != len(rows):
        return None
    return header, rows


def _write_part(path: Path, header: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    lines = [json.dumps({**header, "n": len(rows)})] + [json.dumps(r, ensure_ascii=False) for r in rows]
    _atomic_write(path, "\n".join(lines) + "\n")


def screen(
    probe: "PersonaProbe",
    data: Any,
    vectors: "PersonaVector | Sequence[PersonaVector] | Mapping[str, PersonaVector]",
    layers: int | Sequence,
    *,
    out_dir: str | os.PathLike | None = None,
    shard: tuple[int, int] = (0, 1),
    settings: Mapping[str, Any] | None = None,
    chunk_size: int = 256,
    batch_size: int = 16,
    table_format: str = "parquet",
    drop_top: int | None = None,
    threshold: float | None = None,
    by: str | None = None,
    filtered_out: str | os.PathLike | None = None,
    messages_field: str = "messages",
    id_field: str = "id",
    progress: bool | None = None,
) -> ScreenResult:
    """Per-sample projection differences of chat data, with the dataset's figures.

    Args:
        probe: the *base* model (the one that would be finetuned on the data).
        data: chat data, anything :func:`read_chat_data` reads (JSON lines, Parquet, a saved
            HF dataset folder, a ``datasets.Dataset``, a list of conversations).
        vectors: one :class:`~persona_lens.vectors.PersonaVector`, several (named by their
            trait), or ``{name: vector}``. A vector of another model raises
            ``VectorMismatchError`` before any work.
        layers: one layer or several; every vector is read at every layer from one forward.
        out_dir: where parts, base-response logs, the table (``screen.parquet`` or
            ``screen.jsonl``), ``summary.json`` and the filtered copy go; a rerun resumes
            there. None: in memory (no resume).
        shard: ``(i, n)``: screen the chunks ``c`` with ``c % n == i``; run the ``n`` shards
            on one ``out_dir`` (one process or machine each) and they merge into one table.
        settings: base-response generation (``max_new_tokens``, ``temperature``, ``top_p``,
            ``seed``; default :data:`BASE_SETTINGS`, greedy).
        chunk_size: samples per unit of resumable work (and the most held in memory).
        batch_size: conversations per generation batch and per forward.
        table_format: ``"parquet"`` (through pyarrow) or ``"jsonl"``.
        drop_top, threshold: write a filtered copy of the data without the ``drop_top``
            samples of highest dP, or without those whose dP is above ``threshold``.
        by: the column the filter ranks by (default: the first vector at the first layer).
        filtered_out: where the filtered copy goes (default ``out_dir/filtered.{jsonl,parquet}``
            or a dataset folder, following the input's format; in memory: a list or a
            ``datasets.Dataset``).

    Returns:
        :class:`ScreenResult`. Rows whose sample could not be screened carry the reason in
        ``status`` and None figures.

    Example:
        >>> data = [c.messages for c in world.dataset(6, seed=1)]
        >>> result = pl.screen(probe, data, vec, layers=[2, 3])
        >>> row = result.rows()[0]
        >>> row["status"], round(row["dP_evil_L3"] - (row["proj_evil_L3"] - row["proj_base_evil_L3"]), 6)
        ('ok', 0.0)
        >>> sorted(result.summary["figures"]["dP_evil_L3"])
        ['mean', 'mean_proj', 'mean_proj_base', 'n', 'sem', 'share_positive', 'std']
    """
    i_shard, n_shards = V.shard("shard", shard)
    chunk_size = V.integer("chunk_size", chunk_size, min=1)
    batch_size = V.integer("batch_size", batch_size, min=1)
    V.choice("table_format", table_format, ("parquet", "jsonl"))
    if drop_top is not None and threshold is not None:
        raise ValueError("give drop_top or threshold, not both")
    drop_top = V.integer("drop_top", drop_top, min=0, none_ok=True)
    threshold = V.number("threshold", threshold, none_ok=True)
    V.optional_boolean("progress", progress)
    V.text("messages_field", messages_field, empty_ok=False)
    V.text("id_field", id_field, empty_ok=False)
    if settings is not None:
        from persona_lens.probe.generation import GenerationSettings

        V.mapping("settings", settings, what="a dict of generation settings")
        GenerationSettings.from_kwargs({k: v for k, v in settings.items()})  # each setting checked by name
    if out_dir is None and n_shards != 1:
        raise ValueError("sharding needs out_dir (the shards meet there)")
    if (drop_top is not None or threshold is not None) and not isinstance(data, (str, os.PathLike)) \
            and iter(data) is data:
        raise ValueError("a filtered copy reads the data twice: give a file, a dataset or a list, not an iterator")
    layer_list = probe._layers(layers)
    named = {n: probe._vector(v) for n, v in _named_vectors(vectors).items()}
    settings = {**BASE_SETTINGS, **dict(settings or {})}
    screener = _Screener(probe, named, layer_list, settings, batch_size, _context_length(probe))
    by = by or screener.columns[0]
    if by not in screener.columns or not by.startswith("dP_"):
        raise ValueError(f"by={by!r}: choose one of {[c for c in screener.columns if c.startswith('dP_')]}")

    config = {
        "model": probe.model_name, "vectors": {n: fingerprint(v.directions.tolist()) for n, v in named.items()},
        "layers": layer_list, "settings": settings, "chunk_size": chunk_size, "batch_size": batch_size,
        "messages_field": messages_field, "id_field": id_field,
    }
    total = count_samples(data)
    if total == 0:
        raise ValueError(f"no samples to screen in {_describe_data(data)}")
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        manifest = out / "screen.json"
        if manifest.exists():
            old = read_json(manifest)  # a file cut short is a ValueError that names it
            if old.get("config") != config:
                raise ValueError(
                    f"{out} holds a screen with other settings (model, vectors, layers, generation, chunk or "
                    "batch size); use another output folder or delete it")
        else:
            _atomic_write(manifest, json.dumps({"config": config}, indent=2) + "\n")

    mine = None
    if total is not None:
        n_chunks_total = -(-total // chunk_size)
        mine = sum(min(chunk_size, total - c * chunk_size) for c in range(i_shard, n_chunks_total, n_shards))
    bar = tqdm(total=mine, desc="screen", unit="sample", disable=quiet(progress, 2 if mine is None else mine),
               smoothing=0.1)
    memory_rows: list[dict[str, Any]] = []
    generated = reused = 0
    n_chunks = 0
    # Every chunk's digest, other shards' too: the run is finished only when each part on
    # disk was made from the data as it is now (a part left from other data is not done).
    digests: list[str] = []
    try:
        for c, samples in _chunks(read_chat_data(data, messages_field=messages_field, id_field=id_field), chunk_size):
            n_chunks = c + 1
            digest = fingerprint([(s.index, s.id, s.messages, s.error) for s in samples])
            digests.append(digest)
            if c % n_shards != i_shard:
                continue
            if out is not None:
                part = _read_part(_part_path(out, c))
                if part is not None and part[0].get("data") == digest:
                    bar.update(len(samples))
                    continue
                store = Store(out / "base", generations=f"{c:06d}.jsonl")
            else:
                store = Store(None)
            rows, g, r = screener.run(samples, store)
            generated, reused = generated + g, reused + r
            if out is not None:
                _write_part(_part_path(out, c), {"chunk": c, "data": digest}, rows)
            else:
                memory_rows.extend(rows)
            bar.update(len(samples))
    finally:
        bar.close()
    if n_chunks == 0:  # an iterator that yielded nothing (a file or a list was checked above)
        raise ValueError(f"no samples to screen in {_describe_data(data)}")

    if out is None:
        summary = _summarise(iter(memory_rows), screener.columns, config)
        dropped = _choose_dropped(iter(memory_rows), by, drop_top, threshold)
        filtered = None
        if drop_top is not None or threshold is not None:
            filtered = write_filtered(data, {d[0] for d in dropped}, filtered_out) if filtered_out else \
                _filtered_in_memory(data, {d[0] for d in dropped})
            summary["filter"] = _filter_summary(by, drop_top, threshold, dropped, summary)
        return ScreenResult(summary, True, screener.columns, None, filtered, [d[1] for d in dropped],
                            generated, reused, memory_rows)

    parts = [_part_path(out, c) for c in range(n_chunks)]
    headers = [(_read_part(p) or ({}, None))[0] for p in parts]
    done = sum(h.get("data") == d for h, d in zip(headers, digests))
    if done < n_chunks:
        stale = sum(bool(h) and h.get("data") != d for h, d in zip(headers, digests))
        return ScreenResult({"chunks_done": done, "chunks": n_chunks, "chunks_stale": stale}, False,
                            screener.columns, generated=generated, reused=reused)
    return _finish(out, data, parts, screener.columns, config, table_format, by, drop_top, threshold,
                   filtered_out, generated, reused)


def _describe_data(data: Any) -> str:
    return str(data) if isinstance(data, (str, os.PathLike)) else f"the {type(data).__name__} given"


def _iter_parts(parts: Sequence[Path]) -> Iterator[dict[str, Any]]:
    seen = -1
    for p in parts:
        got = _read_part(p)
        if got is None:
            raise ValueError(f"{p} is unreadable; delete it and rerun to redo that chunk")
        for row in got[1]:
            if row["index"] <= seen:
                raise ValueError(f"{p}: sample {row['index']} is out of order or repeated")
            seen = row["index"]
            yield row


def _finish(out, data, parts, columns, config, table_format, by, drop_top, threshold, filtered_out,
            generated, reused) -> ScreenResult:
    table = out / f"screen.{table_format}"
    _write_table(table, _iter_parts(parts), columns)
    summary = _summarise(_iter_parts(parts), columns, config)
    dropped = _choose_dropped(_iter_parts(parts), by, drop_top, threshold)
    filtered = None
    if drop_top is not None or threshold is not None:
        filtered = write_filtered(data, {d[0] for d in dropped}, filtered_out or _default_filtered(out, data))
        summary["filter"] = _filter_summary(by, drop_top, threshold, dropped, summary)
    _atomic_write(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return ScreenResult(summary, True, columns, table, filtered, [d[1] for d in dropped], generated, reused)


def _filter_summary(by, drop_top, threshold, dropped, summary) -> dict[str, Any]:
    screened = summary["status"].get(OK, 0)
    if dropped and len(dropped) >= screened:
        # a filter that keeps no screened sample is almost always a K meant for a larger dataset
        rule = f"drop_top={drop_top}" if drop_top is not None else f"threshold={threshold}"
        warnings.warn(f"the filter ({rule}) drops all {screened} screened samples; the filtered copy holds only "
                      f"the {summary['samples'] - screened} that could not be screened", UserWarning, stacklevel=3)
    return {"by": by, "drop_top": drop_top, "threshold": threshold, "dropped": len(dropped),
            "lowest_dropped": min((d[2] for d in dropped), default=None)}


# ----------------------------------------------------------------------------- tables and figures


def _schema(columns: Sequence[str]):
    import pyarrow as pa

    fields = [("index", pa.int64()), ("id", pa.string()), ("status", pa.string()),
              ("n_prompt_tokens", pa.int64()), ("n_response_tokens", pa.int64()), ("n_base_tokens", pa.int64()),
              ("base_response", pa.string())]
    return pa.schema(fields + [(c, pa.float64()) for c in columns])


def _write_table(path: Path, rows: Iterator[dict[str, Any]], columns: Sequence[str], every: int = 1024) -> None:
    """Write rows as Parquet (pyarrow, one row group per ``every`` rows) or JSON lines,
    streaming, to a temporary name renamed at the end."""
    with atomic_path(path) as tmp:
        if path.suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            schema = _schema(columns)
            with pq.ParquetWriter(tmp, schema) as writer:
                buf: list[dict[str, Any]] = []
                for row in rows:
                    buf.append(row)
                    if len(buf) == every:
                        writer.write_table(pa.Table.from_pylist(buf, schema=schema))
                        buf = []
                if buf:
                    writer.write_table(pa.Table.from_pylist(buf, schema=schema))
        else:
            with tmp.open("w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _read_table(path: Path) -> Iterator[dict[str, Any]]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches():
            yield from batch.to_pylist()
    else:
        with path.open(encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)


def _summarise(rows: Iterator[dict[str, Any]], columns: Sequence[str], config: dict[str, Any]) -> dict[str, Any]:
    """Dataset-level figures, streamed (a few running sums per column)."""
    dps = [c for c in columns if c.startswith("dP_")]
    acc = {c: [0, 0.0, 0.0, 0, 0.0, 0.0] for c in dps}  # n, sum, sumsq, positive, sum proj, sum base
    status: dict[str, int] = {}
    n = 0
    for row in rows:
        n += 1
        key = row["status"].split(":")[0]
        status[key] = status.get(key, 0) + 1
        if row["status"] != OK:
            continue
        for c in dps:
            x = row[c]
            a = acc[c]
            a[0] += 1
            a[1] += x
            a[2] += x * x
            a[3] += x > 0
            a[4] += row["proj_" + c[3:]]
            a[5] += row["proj_base_" + c[3:]]
    figures = {}
    for c, (k, s, ss, pos, sp, sb) in acc.items():
        mean = s / k if k else math.nan
        var = (ss - k * mean * mean) / (k - 1) if k > 1 else math.nan
        std = math.sqrt(max(var, 0.0)) if k > 1 else math.nan
        figures[c] = {"n": k, "mean": mean, "std": std, "sem": std / math.sqrt(k) if k > 1 else math.nan,
                      "share_positive": pos / k if k else math.nan,
                      "mean_proj": sp / k if k else math.nan, "mean_proj_base": sb / k if k else math.nan}
    return {"samples": n, "status": status, "figures": figures, "config": config}


def _choose_dropped(rows: Iterator[dict[str, Any]], by: str, drop_top: int | None,
                    threshold: float | None) -> list[tuple[int, str, float]]:
    """(index, id, dP) of the rows the filter leaves out, highest dP first. Rows that were
    not screened are kept (nothing says they carry the trait)."""
    if drop_top is None and threshold is None:
        return []
    if threshold is not None:
        out = [(r["index"], r["id"], r[by]) for r in rows if r["status"] == OK and r[by] > threshold]
    else:
        out = heapq.nlargest(drop_top, ((r["index"], r["id"], r[by]) for r in rows if r["status"] == OK),
                             key=lambda t: (t[2], -t[0]))
    return sorted(out, key=lambda t: (-t[2], t[0]))


def _default_filtered(out: Path, data: Any) -> Path:
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if path.is_dir():
            return out / "filtered"
        if path.suffix == ".parquet":
            return out / "filtered.parquet"
    return out / "filtered.jsonl"


def _filtered_in_memory(data: Any, dropped: set[int]) -> Any:
    if _is_hf_dataset(data):
        return data.select([i for i in range(len(data)) if i not in dropped])
    if isinstance(data, (str, os.PathLike)):
        return [s.messages for s in read_chat_data(data) if s.index not in dropped]
    return [row for i, row in enumerate(data) if i not in dropped]


def write_filtered(data: Any, dropped: set[int], out: str | os.PathLike) -> Path:
    """Copy ``data`` to ``out`` without the samples whose index is in ``dropped``, streaming,
    in the input's format: JSON lines keep their lines verbatim, Parquet keeps its schema
    (every column), a dataset folder or a ``datasets.Dataset`` becomes a saved dataset
    folder, anything else JSON lines of its rows.

    Example:
        >>> rows = [{"messages": [{"role": "user", "content": "hi"}]}, {"messages": []}]
        >>> path = write_filtered(rows, {0}, "kept.jsonl")
        >>> path.read_text()
        '{"messages": []}\\n'
    """
    out = V.path("out", out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, (str, os.PathLike)) and not Path(data).is_dir():
        path = Path(data)
        with atomic_path(out) as tmp:
            if path.suffix == ".parquet":
                import pyarrow as pa
                import pyarrow.parquet as pq

                pf = pq.ParquetFile(path)
                with pq.ParquetWriter(tmp, pf.schema_arrow) as writer:
                    start = 0
                    for batch in pf.iter_batches(batch_size=4096):
                        keep = [start + j not in dropped for j in range(batch.num_rows)]
                        writer.write_table(pa.Table.from_batches([batch]).filter(pa.array(keep)))
                        start += batch.num_rows
            else:
                with path.open(encoding="utf-8", errors="replace") as src, tmp.open("w", encoding="utf-8") as dst:
                    index = 0
                    for line in src:
                        if not line.strip():
                            continue
                        if index not in dropped:
                            dst.write(line if line.endswith("\n") else line + "\n")
                        index += 1
        return out
    if _is_hf_dataset(data) or isinstance(data, (str, os.PathLike)):
        import datasets

        ds = datasets.load_from_disk(str(data)) if isinstance(data, (str, os.PathLike)) else data
        ds.select([i for i in range(len(ds)) if i not in dropped]).save_to_disk(str(out))
        return out
    with atomic_path(out) as tmp, tmp.open("w", encoding="utf-8") as dst:
        for i, row in enumerate(data):
            if i not in dropped:
                dst.write(json.dumps(row, ensure_ascii=False) + "\n")
    return out
