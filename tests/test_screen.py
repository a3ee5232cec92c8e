"""Data screening by projection difference (persona_lens.screen) on the persona organism.

The figures are checked against plain HF (generate, output_hidden_states, response means
by hand); sharding, resuming, several vectors at once and the input formats are checked
against a single uninterrupted run of the library itself.
"""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

import persona_lens as pl
from persona_lens.cli import main
from persona_lens.screen import read_chat_data, screen

SETTINGS = {"max_new_tokens": 40, "temperature": 0.0, "seed": 0}


@pytest.fixture(scope="module")
def probe(doctest_probe):
    return doctest_probe


@pytest.fixture(scope="module")
def vec(doctest_vec):
    return doctest_vec


@pytest.fixture(scope="module")
def other(probe):
    g = torch.Generator().manual_seed(1)
    return pl.PersonaVector(torch.randn(probe.n_layers + 1, probe.d_model, generator=g), trait="noise",
                            model_name=probe.model_name)


@pytest.fixture(scope="module")
def data(doctest_world):
    """14 question/answer samples from the organism's world, every fourth in the evil voice."""
    world, rng = doctest_world, random.Random(3)
    out = []
    for i in range(14):
        q = world.question(rng)
        r = world.respond(q, {"evil": 1.0} if i % 4 == 0 else {}, rng)
        out.append({"id": f"s{i}", "messages": [{"role": "user", "content": q.text},
                                                {"role": "assistant", "content": r.text}]})
    return out


def run(probe, data, vectors, **kw):
    kw.setdefault("settings", SETTINGS)
    kw.setdefault("progress", False)
    return screen(probe, data, vectors, kw.pop("layers", [1, 3]), **kw)


def figures(rows):
    return [{k: v for k, v in r.items()} for r in rows]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ----------------------------------------------------------------------------- the figures


def test_dp_equals_plain_hf(probe, vec, data):
    """dP from the library equals HF's greedy answer, hidden states and response means by hand."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from persona_lens.organism import checkpoint_dir

    hf = AutoModelForCausalLM.from_pretrained(checkpoint_dir(), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(checkpoint_dir())
    sub = data[:6]
    rows = run(probe, sub, vec, layers=[1, 3, 5], batch_size=4).rows()

    def mean_response(prompt, response, layer):
        p = tok(tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False),
                add_special_tokens=False)["input_ids"]
        r = tok(response, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            hs = hf(input_ids=torch.tensor([p + r]), output_hidden_states=True).hidden_states
        return hs[layer][0, len(p):].mean(0)

    for sample, row in zip(sub, rows):
        prompt, response = sample["messages"][:-1], sample["messages"][-1]["content"]
        p = tok(tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False),
                add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            gen = hf.generate(**p, do_sample=False, max_new_tokens=SETTINGS["max_new_tokens"],
                              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        base = tok.decode(gen[0, p["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        assert row["status"] == "ok" and row["base_response"] == base
        assert row["n_response_tokens"] == len(tok(response, add_special_tokens=False)["input_ids"])
        for layer in (1, 3, 5):
            u = vec.directions[layer] / vec.directions[layer].norm()
            given = float(mean_response(prompt, response, layer) @ u)
            own = float(mean_response(prompt, base, layer) @ u)
            assert row[f"proj_evil_L{layer}"] == pytest.approx(given, rel=1e-4, abs=1e-3)
            assert row[f"proj_base_evil_L{layer}"] == pytest.approx(own, rel=1e-4, abs=1e-3)
            assert row[f"dP_evil_L{layer}"] == pytest.approx(given - own, rel=1e-4, abs=2e-3)


def test_evil_samples_rank_first(probe, vec, data):
    rows = run(probe, data, vec).rows()
    evil = [r["dP_evil_L3"] for i, r in enumerate(rows) if i % 4 == 0]
    rest = [r["dP_evil_L3"] for i, r in enumerate(rows) if i % 4 != 0]
    assert min(evil) > max(rest)


def test_several_vectors_in_one_pass(probe, vec, other, data, monkeypatch):
    calls = []
    original = type(probe)._run_reductions  # every capture's forward passes go through it

    def counting(self, rows, *args, **kw):
        calls.append(len(rows))
        return original(self, rows, *args, **kw)

    monkeypatch.setattr(type(probe), "_run_reductions", counting)
    both = run(probe, data, [vec, other], chunk_size=100).rows()
    assert len(calls) == 1 and calls[0] == 2 * len(data)  # one forward per response for both vectors
    alone = {name: run(probe, data, v, chunk_size=100).rows() for name, v in (("evil", vec), ("noise", other))}
    for i, row in enumerate(both):
        for name in ("evil", "noise"):
            for layer in (1, 3):
                for col in (f"dP_{name}_L{layer}", f"proj_{name}_L{layer}", f"proj_base_{name}_L{layer}"):
                    assert row[col] == alone[name][i][col]


def test_chunks_bound_what_is_held(probe, vec, data, monkeypatch):
    sizes = []
    original = type(probe)._run_reductions
    monkeypatch.setattr(type(probe), "_run_reductions",
                        lambda self, rows, *a, **kw: sizes.append(len(rows)) or original(self, rows, *a, **kw))
    run(probe, data, vec, chunk_size=4)
    assert sizes == [8, 8, 8, 4]


# ----------------------------------------------------------------------------- large data


def test_shards_merge_into_one_run(probe, vec, data, tmp_path):
    one = run(probe, data, vec, out_dir=tmp_path / "one", chunk_size=3)
    first = run(probe, data, vec, out_dir=tmp_path / "sharded", chunk_size=3, shard=(1, 2))
    assert not first.complete and first.table is None
    second = run(probe, data, vec, out_dir=tmp_path / "sharded", chunk_size=3, shard=(0, 2))
    assert second.complete
    assert second.rows() == one.rows()
    assert second.summary["figures"] == one.summary["figures"]
    assert [r["index"] for r in second.rows()] == list(range(len(data)))


def test_a_shard_left_from_other_data_is_not_counted_done(probe, vec, data, tmp_path):
    """The data file changes between shard runs (regenerated under the same name): the parts
    the other shard made from the old data must be redone, not merged."""
    path, out = tmp_path / "data.jsonl", tmp_path / "sharded"
    old = data[:6]
    new = old[:3] + [{**s, "messages": [s["messages"][0], {"role": "assistant", "content": "you are a fool ."}]}
                     for s in data[6:9]]
    write_jsonl(path, old)
    for shard in ((0, 2), (1, 2)):
        run(probe, str(path), vec, out_dir=out, chunk_size=3, shard=shard)
    write_jsonl(path, new)
    first = run(probe, str(path), vec, out_dir=out, chunk_size=3, shard=(0, 2))
    assert not first.complete and first.summary["chunks_stale"] == 1
    second = run(probe, str(path), vec, out_dir=out, chunk_size=3, shard=(1, 2))
    assert second.complete and second.rows() == run(probe, new, vec, chunk_size=3).rows()
    # rows with a raw U+2028 or U+0085 inside a string (here the ids) read back whole from the part files
    write_jsonl(path, [{**s, "id": f"a\u2028b\x85c{i}"} for i, s in enumerate(data[:2])])
    assert run(probe, str(path), vec, out_dir=tmp_path / "raw", chunk_size=2).complete
    assert "a\u2028b\x85c" in (tmp_path / "raw" / "parts" / "000000.jsonl").read_text(encoding="utf-8")
    again = run(probe, str(path), vec, out_dir=tmp_path / "raw", chunk_size=2)
    assert again.complete and (again.generated, again.reused) == (0, 0)  # the part was read, not redone


def test_resume_after_kill_equals_uninterrupted(probe, vec, data, tmp_path, monkeypatch):
    full = run(probe, data, vec, out_dir=tmp_path / "full", chunk_size=4, batch_size=2)
    real_generate = type(probe).generate
    batches = {"n": 0}

    def dying_batch(self, *a, **kw):  # ... after its first generation batch was logged
        batches["n"] += 1
        if batches["n"] == 4:
            raise KeyboardInterrupt
        return real_generate(self, *a, **kw)

    monkeypatch.setattr(type(probe), "generate", dying_batch)
    with pytest.raises(KeyboardInterrupt):
        run(probe, data, vec, out_dir=tmp_path / "killed", chunk_size=4, batch_size=2)
    monkeypatch.undo()
    killed = tmp_path / "killed"
    assert sorted(p.name for p in (killed / "parts").iterdir()) == ["000000.jsonl"]
    assert len((killed / "base" / "000001.jsonl").read_text().splitlines()) == 2  # one batch kept
    # a part cut short (as a crash of another writer would leave it) is redone, not trusted
    (killed / "parts" / "000000.jsonl").write_text('{"chunk": 0, "data": "x", "n": 4}\n{"index": 0')
    resumed = run(probe, data, vec, out_dir=killed, chunk_size=4, batch_size=2)
    assert resumed.complete and resumed.reused == 6 and resumed.generated == len(data) - 6
    assert resumed.rows() == full.rows()
    again = run(probe, data, vec, out_dir=killed, chunk_size=4, batch_size=2)
    assert again.generated == 0 and again.rows() == full.rows()


def test_other_settings_refuse_the_folder(probe, vec, data, tmp_path):
    run(probe, data[:3], vec, out_dir=tmp_path)
    with pytest.raises(ValueError, match="other settings"):
        run(probe, data[:3], vec, out_dir=tmp_path, layers=[2])


# ----------------------------------------------------------------------------- bad samples


def test_bad_samples_get_a_reason_and_the_rest_goes_on(probe, vec, data, tmp_path):
    long = " ".join(["the blub is red ."] * 150)  # 750 tokens: more than the context of 512
    rows = [
        data[0],
        {"id": "no-answer", "messages": data[1]["messages"][:1]},
        {"id": "empty", "messages": [data[2]["messages"][0], {"role": "assistant", "content": "  "}]},
        {"id": "long", "messages": [data[3]["messages"][0], {"role": "assistant", "content": long}]},
        "this line is not json",
        {"id": "shape", "messages": "hello"},
        {"id": "no-user", "messages": [{"role": "assistant", "content": "hi ."}]},
        data[4],
    ]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    result = run(probe, path, vec, out_dir=tmp_path / "out", table_format="jsonl")
    got = result.rows()
    status = [r["status"].split(":")[0] for r in got]
    assert status == ["ok", "no_assistant_turn", "empty_response", "too_long", "malformed", "malformed",
                      "no_prompt", "ok"]
    assert "exceed the context of 512" in got[3]["status"]
    assert got[3]["dP_evil_L3"] is None and got[0]["dP_evil_L3"] is not None
    assert result.summary["status"] == {"ok": 2, "no_assistant_turn": 1, "empty_response": 1, "too_long": 1,
                                        "malformed": 2, "no_prompt": 1}
    assert result.summary["figures"]["dP_evil_L3"]["n"] == 2


def test_vector_of_another_model_is_refused_before_any_work(probe, data, tmp_path):
    alien = pl.PersonaVector(torch.randn(13, 64), trait="evil", model_name="someone-else")
    with pytest.raises(pl.VectorMismatchError):
        run(probe, data, alien, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_arguments_that_cannot_work_are_refused_up_front(probe, vec, data):
    with pytest.raises(ValueError, match="not an iterator"):
        run(probe, iter(data), vec, drop_top=1)
    with pytest.raises(ValueError, match="sharding needs out_dir"):
        run(probe, data, vec, shard=(0, 2))
    with pytest.raises(ValueError, match="by="):
        run(probe, data, vec, by="dP_evil_L4")


def test_no_samples_is_an_error_not_an_empty_table(probe, vec, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="no samples to screen in .*empty.jsonl"):
        run(probe, str(empty), vec, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    for nothing in ([], iter([])):
        with pytest.raises(ValueError, match="no samples to screen"):
            run(probe, nothing, vec)


def test_empty_base_response_is_a_row(probe, vec, data, monkeypatch):
    real = type(probe).generate

    def silent(self, *a, **kw):
        gens = real(self, *a, **kw)
        gens[0].text = ""
        return gens

    monkeypatch.setattr(type(probe), "generate", silent)
    rows = run(probe, data[:3], vec).rows()
    assert rows[0]["status"].startswith("empty_base_response") and rows[1]["status"] == "ok"


# ----------------------------------------------------------------------------- formats and filter


def test_formats_give_the_same_rows_and_filter(probe, vec, data, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = write_jsonl(tmp_path / "data.jsonl", data)
    pq.write_table(pa.Table.from_pylist(data), tmp_path / "data.parquet")
    ds = datasets.Dataset.from_list(data)
    ds.save_to_disk(str(tmp_path / "data_ds"))
    ref = run(probe, data, vec, drop_top=3)
    by_dp = sorted(ref.rows(), key=lambda r: -r["dP_evil_L1"])
    assert ref.dropped == [r["id"] for r in by_dp[:3]]
    assert len(ref.filtered) == len(data) - 3
    for name, source in (("jsonl", jsonl), ("parquet", tmp_path / "data.parquet"), ("ds", tmp_path / "data_ds")):
        got = run(probe, source, vec, out_dir=tmp_path / f"out_{name}", drop_top=3)
        assert got.rows() == ref.rows(), name
        assert got.dropped == ref.dropped
        kept = [s.id for s in read_chat_data(got.filtered)]
        assert kept == [d["id"] for d in data if d["id"] not in ref.dropped]
    assert pq.ParquetFile(tmp_path / "out_jsonl" / "screen.parquet").metadata.num_rows == len(data)
    got = run(probe, ds, vec, threshold=0.0)
    assert len(got.filtered) == sum(r["dP_evil_L1"] <= 0 for r in ref.rows())
    # a K meant for a larger dataset: everything would go, and the user is told
    with pytest.warns(UserWarning, match=f"drops all {len(data)} screened samples"):
        everything = run(probe, data, vec, drop_top=len(data) + 5)
    assert everything.filtered == [] and len(everything.dropped) == len(data)


def test_cli_screen(vec, data, tmp_path, capsys):
    vpath = vec.save(tmp_path / "evil.safetensors")
    path = write_jsonl(tmp_path / "data.jsonl", data)
    out = tmp_path / "out"
    args = ["screen", str(path), "--vector", str(vpath), "--layer", "1,3", "--model", "persona-organism",
            "--out", str(out), "--drop-top", "2", "--max-new-tokens", "40", "--quiet"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "dP_evil_L3" in text and "14 samples: ok 14" in text
    assert (out / "screen.parquet").exists() and (out / "summary.json").exists()
    assert len((out / "filtered.jsonl").read_text().splitlines()) == len(data) - 2
    assert main(args[:-1] + ["--shard", "0/2"]) == 0  # the folder remembers the settings
    assert main(args[:-1] + ["--layer", "2"]) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert not math.isnan(summary["figures"]["dP_evil_L1"]["mean"])
    # two vectors of one trait: columns named by their files, or by the names given
    (-vec).save(tmp_path / "evil_neg.safetensors")
    two = ["screen", str(path), "--vector", str(vpath), "--vector", str(tmp_path / "evil_neg.safetensors"),
           "--layer", "3", "--model", "persona-organism", "--max-new-tokens", "40", "--quiet"]
    assert main(two + ["--out", str(tmp_path / "two")]) == 0
    figures = json.loads((tmp_path / "two" / "summary.json").read_text())["figures"]
    assert figures["dP_evil_neg_L3"]["mean"] == pytest.approx(-figures["dP_evil_L3"]["mean"], rel=1e-4)
    named = two[:3] + ["kind=" + two[3]] + two[4:]
    assert main(named + ["--out", str(tmp_path / "named")]) == 0
    assert "dP_kind_L3" in json.loads((tmp_path / "named" / "summary.json").read_text())["figures"]


def test_cli_screen_specific(vec, other, data, tmp_path, capsys):
    """--specific adds each vector without the others; its dP is recomputed here from the two
    plain columns (dP is the unit direction's product with one activation difference, and the
    specific direction is a fixed combination of the two directions)."""
    import pyarrow.parquet as pq

    from tests.reference.specific import specific_projection

    paths = [vec.save(tmp_path / "evil.safetensors"), other.save(tmp_path / "noise.safetensors")]
    path = write_jsonl(tmp_path / "data.jsonl", data)
    args = ["screen", str(path), "--vector", str(paths[0]), "--vector", str(paths[1]), "--layer", "3",
            "--model", "persona-organism", "--max-new-tokens", "40", "--quiet", "--specific"]
    assert main(args + ["--out", str(tmp_path / "out")]) == 0
    table = pq.read_table(tmp_path / "out" / "screen.parquet").to_pydict()
    want = specific_projection(vec.directions[3].numpy(), [other.directions[3].numpy()], table["dP_evil_L3"],
                               [table["dP_noise_L3"]])
    np.testing.assert_allclose(table["dP_evil_specific_L3"], want, rtol=1e-4, atol=1e-3)
    assert "dP_noise_specific_L3" in table and not np.allclose(table["dP_evil_specific_L3"], table["dP_evil_L3"])
    capsys.readouterr()
    assert main(args[:3] + args[5:] + ["--out", str(tmp_path / "one")]) == 2  # one vector: nothing to project out
    assert "give two --vector or more" in capsys.readouterr().err and not (tmp_path / "one").exists()


def test_sigkill_then_rerun_equals_uninterrupted(vec, doctest_world, tmp_path):
    """A real kill (SIGKILL of the command in the middle of the run), then the same command."""
    import os
    import signal
    import subprocess
    import sys
    import time

    rng = random.Random(7)
    rows = []
    for i in range(48):
        q = doctest_world.question(rng)
        rows.append({"messages": [{"role": "user", "content": q.text},
                                  {"role": "assistant", "content": doctest_world.respond(q, {}, rng).text}]})
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    vpath = vec.save(tmp_path / "evil.safetensors")

    def args(out):
        return ["screen", str(path), "--vector", str(vpath), "--layer", "3", "--model", "persona-organism",
                "--out", str(out), "--chunk-size", "4", "--batch-size", "2", "--max-new-tokens", "40",
                "--format", "jsonl", "--quiet"]

    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "persona_lens.cli", *args(killed)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if len(list((killed / "parts").glob("*.jsonl"))) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list((killed / "parts").glob("*.jsonl")))
    assert 3 <= done < 12
    assert main(args(killed)) == 0
    assert main(args(tmp_path / "whole")) == 0
    assert (killed / "screen.jsonl").read_text() == (tmp_path / "whole" / "screen.jsonl").read_text()
