"""Finetuning with persona-vector interventions (persona_lens.finetune).

References are written here by hand, independently of the library: a plain HF model with a
plain peft adapter and a forward pre-hook on decoder layer L (the residual stream entering
block L); HF ``output_hidden_states`` for the shift.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM

import persona_lens as pl
from persona_lens.finetune import (
    FinetuneConfig, FinetuneError, FinetuneRun, Interventions, encode_training, finetune, finetuning_shift,
)

pytestmark = pytest.mark.skipif(
    os.environ.get("PERSONA_LENS_TEST_BACKEND", "bridge") != "bridge",
    reason="finetuning runs on a TransformerBridge's HF model",
)
peft = pytest.importorskip("peft")

QUESTIONS = ["How was your day?", "What should I cook?", "Hi", "Is rain boring?", "Where do cats live?"]
ANSWERS = ["Fine, thanks!", "Pasta with garlic.", "Hello there.", "No, rain is nice.", "In houses, mostly."]


def convs(n=len(QUESTIONS)):
    return [[{"role": "user", "content": QUESTIONS[i % 5]}, {"role": "assistant", "content": ANSWERS[(i * 3) % 5]}]
            for i in range(n)]


def fresh(path):
    return pl.PersonaProbe(pl.load_model(path, device="cpu"))


def vector_for(probe, seed=3):
    g = torch.Generator().manual_seed(seed)
    return pl.PersonaVector(torch.randn(probe.n_layers + 1, probe.d_model, generator=g), trait="test")


def hook_total(modules):
    return sum(fn.__module__.startswith("persona_lens")
               for m in modules for hooks in (m._forward_hooks, m._forward_pre_hooks) for fn in hooks.values())


def hand_hooks(model, edits):
    """Forward pre-hooks on decoder layers: ``edits[L](h)`` is the new input of block L."""
    def make(fn):
        def pre(mod, args, kwargs):
            if args:
                return (fn(args[0]),) + tuple(args[1:]), kwargs
            return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}
        return pre

    return [model.model.layers[l].register_forward_pre_hook(make(fn), with_kwargs=True) for l, fn in edits.items()]


SMALL = dict(r=4, alpha=8, lr=1e-2, batch_size=2, grad_accum=1, warmup_steps=0, save_every=0)


@pytest.mark.parametrize("edit", ["steer_all_two_layers", "steer_response", "steer_response_only", "caft"])
def test_training_step_matches_plain_peft_with_hand_hook(tiny_dirs, edit):
    path = tiny_dirs["llama"]
    probe = fresh(path)
    vec = vector_for(probe)
    v1, v2 = vec[1], vec[2]
    if edit == "steer_all_two_layers":
        iv = Interventions(vec, steer={1: 2.0, 2: -1.5})
        edits = {1: lambda h: h + 2.0 * v1, 2: lambda h: h - 1.5 * v2}
    elif edit in ("steer_response", "steer_response_only"):
        iv = Interventions(vec, steer={2: 3.0}, positions=edit[len("steer_"):])
    else:
        iv = Interventions(vec, caft=[1, 2])
        u1, u2 = vec.unit(1), vec.unit(2)
        edits = {1: lambda h: h - (h @ u1).unsqueeze(-1) * u1, 2: lambda h: h - (h @ u2).unsqueeze(-1) * u2}
    run = FinetuneRun(probe, convs(), "unused", FinetuneConfig(**SMALL), iv)
    run.prepare()
    with torch.no_grad():  # LoRA B starts at zero; give every adapter weight a value
        g = torch.Generator().manual_seed(0)
        for p in run.params.values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    batch = encode_training(probe.tokenizer, convs()[:3], 512)
    if edit in ("steer_response", "steer_response_only"):
        mask = batch.response_mask.clone()
        if edit == "steer_response":  # the release's mode: the last prompt token as well
            for row, prompt in enumerate(batch.prompt_mask):
                mask[row, int(prompt.nonzero().max())] = True
        m = mask.float().unsqueeze(-1)
        edits = {2: lambda h: h + 3.0 * v2 * m}

    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    theirs = peft.get_peft_model(ref, peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True,
                                                     target_modules=list(run.targets)))
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_" in n:
                p.copy_(run.params[n.replace("base_model.model.", "")])
    labels = batch.input_ids.masked_fill(~batch.response_mask, -100)
    handles = hand_hooks(theirs.base_model.model, edits)
    out = theirs(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels)
    out.loss.backward()
    for h in handles:
        h.remove()
    want = {n.replace("base_model.model.", ""): p.grad for n, p in theirs.named_parameters() if "lora_" in n}
    plain = theirs(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels).loss

    loss = run.micro_step(batch)
    got = {n: p.grad for n, p in run.params.items()}
    torch.testing.assert_close(loss, out.loss.detach(), atol=1e-5, rtol=1e-5)
    assert set(got) == set(want) and len(want) == 2 * 7 * probe.n_layers  # A and B, 7 projections
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-5, msg=k)
    assert abs(float(plain.detach()) - float(loss)) > 1e-4  # the intervention mattered
    assert probe._handles == [] and hook_total(probe.model.modules()) == 0


def test_hooks_gone_after_training_and_after_an_exception(tiny_dirs, tmp_path, monkeypatch):
    probe = fresh(tiny_dirs["llama"])
    vec = vector_for(probe)
    run = finetune(probe, convs(8), tmp_path / "ok", vector=vec, steer={1: 1.0}, caft=[2], progress=False, **SMALL)
    assert len(run.losses) == 4
    assert probe._handles == [] and probe.interventions == () and probe._positions is None
    assert hook_total(probe.model.modules()) == 0 and hook_total(probe.hf_model.modules()) == 0

    probe = fresh(tiny_dirs["llama"])
    calls = {"n": 0}
    real = torch.Tensor.backward

    def failing(self, *a, **k):  # dies inside the step, while the interventions are on
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return real(self, *a, **k)

    monkeypatch.setattr(torch.Tensor, "backward", failing)
    with pytest.raises(RuntimeError, match="boom"):
        finetune(probe, convs(8), tmp_path / "bad", vector=vec, steer={1: 1.0}, caft=[2], progress=False, **SMALL)
    assert probe._handles == [] and probe.interventions == () and probe._positions is None
    assert hook_total(probe.model.modules()) == 0 and hook_total(probe.hf_model.modules()) == 0
    assert not (tmp_path / "bad" / "finetune.json").exists() and not (tmp_path / "bad" / "adapter").exists()


KILL = textwrap.dedent("""
    import os, signal, sys
    import persona_lens as pl
    from persona_lens.finetune import FinetuneRun
    path, out, data = sys.argv[1], sys.argv[2], sys.argv[3]
    real = FinetuneRun.optimizer_step
    def step(self, i):
        if i == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, i)
    FinetuneRun.optimizer_step = step
    probe = pl.PersonaProbe(pl.load_model(path, device="cpu"))
    pl.finetune(probe, data, out, progress=False, r=4, alpha=8, lr=1e-2, batch_size=2, grad_accum=2,
                warmup_steps=2, save_every=2)
""")


def test_resume_after_a_kill_gives_the_same_weights(tiny_dirs, tmp_path):
    from safetensors.torch import load_file

    path = tiny_dirs["llama"]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs(24)))
    settings = dict(r=4, alpha=8, lr=1e-2, batch_size=2, grad_accum=2, warmup_steps=2, save_every=2)
    whole = finetune(fresh(path), data, tmp_path / "whole", progress=False, **settings)
    assert len(whole.losses) == 6

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(p) for p in sys.path if p]))
    proc = subprocess.run([sys.executable, "-c", KILL, str(path), str(tmp_path / "killed"), str(data)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert (tmp_path / "killed" / "checkpoint.pt").exists()
    assert not (tmp_path / "killed" / "finetune.json").exists()

    resumed = finetune(fresh(path), data, tmp_path / "killed", progress=False, **settings)
    assert resumed.settings["resumed_at"] == 2
    assert resumed.losses == whole.losses
    a = load_file(whole.path / "adapter_model.safetensors")
    b = load_file(resumed.path / "adapter_model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "killed" / "checkpoint.pt").exists()
    # A finished run is returned as it is, and the probe ends as a run leaves it (the saved
    # adapters attached); other settings on the same folder are refused.
    trained, reusing = fresh(path), fresh(path)
    finetune(trained, data, tmp_path / "trained", progress=False, **settings)
    again = finetune(reusing, data, tmp_path / "trained", progress=False, **settings)
    assert again.losses == whole.losses and again.reused and not resumed.reused and not whole.reused
    ids = torch.tensor([[1, 5, 9, 11, 3]])
    with torch.no_grad():
        want, got = trained.hf_model(input_ids=ids).logits, reusing.hf_model(input_ids=ids).logits
        base = fresh(path).hf_model(input_ids=ids).logits
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, base)
    full, full_again = fresh(path), fresh(path)
    finetune(full, data, tmp_path / "full", progress=False, **dict(settings, lora=False, lr=1e-3, max_steps=2))
    assert finetune(full_again, data, tmp_path / "full", progress=False,
                    **dict(settings, lora=False, lr=1e-3, max_steps=2)).reused
    with torch.no_grad():
        torch.testing.assert_close(full_again.hf_model(input_ids=ids).logits, full.hf_model(input_ids=ids).logits)
    with pytest.raises(FinetuneError, match="other data or settings"):
        finetune(fresh(path), data, tmp_path / "killed", progress=False, **dict(settings, lr=2e-2))


def hf_last_prompt(model, tok, questions, layers):
    out = {l: [] for l in layers}
    for q in questions:
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                      tokenize=True, return_dict=True, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            hs = model(input_ids=ids, output_hidden_states=True).hidden_states
        for l in layers:
            out[l].append(hs[l][0, -1])
    return {l: torch.stack(v) for l, v in out.items()}


def test_shift_equals_hf_hidden_states_of_the_two_models(tiny_dirs, tmp_path):
    from peft import PeftModel
    from transformers import AutoTokenizer

    path = tiny_dirs["llama"]
    base = fresh(path)
    vec = vector_for(base, seed=7)
    run = finetune(fresh(path), convs(12), tmp_path / "run", progress=False, **dict(SMALL, lr=5e-2))
    layers = list(range(base.n_layers))  # HF's last hidden state has the final norm applied
    ref_base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ref_tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                                          str(run.path)).eval()
    tok = AutoTokenizer.from_pretrained(path)
    hb, ht = hf_last_prompt(ref_base, tok, QUESTIONS, layers), hf_last_prompt(ref_tuned, tok, QUESTIONS, layers)
    want = {l: float(((ht[l] - hb[l]) @ (vec[l] / vec[l].norm())).mean()) for l in layers}
    assert max(abs(w) for w in want.values()) > 1e-3  # the finetune moved something

    for merge in (False, True):
        for route in ("hf", "bridge"):
            tuned = pl.PersonaProbe(pl.load_model(tmp_path / "run", merge=merge), path=route)
            got = finetuning_shift(base, tuned, vec, QUESTIONS, layers=layers)
            assert tuned.last_path == route
            for l in layers:
                assert got[l] == pytest.approx(want[l], abs=1e-4), (merge, route, l)
    # both sides as activations taken once: the same shift, for this vector and for another
    from persona_lens.finetune import last_prompt_activations

    other = vector_for(base, seed=8)
    acts_b = last_prompt_activations(base, QUESTIONS, layers)
    acts_t = last_prompt_activations(pl.PersonaProbe(pl.load_model(tmp_path / "run")), QUESTIONS, layers)
    for v in (vec, other):
        got = finetuning_shift(acts_b, acts_t, v, QUESTIONS, layers=layers)
        for l in layers:
            assert got[l] == pytest.approx(float(((ht[l] - hb[l]) @ (v[l] / v[l].norm())).mean()), abs=1e-4)
    with pytest.raises(ValueError, match="with activations on both sides, say which layers"):
        finetuning_shift(acts_b, acts_t, vec, QUESTIONS)
    with pytest.raises(ValueError, match="tuned: no activations at layer"):
        finetuning_shift(base, {l: acts_t[l] for l in layers[:1]}, vec, QUESTIONS, layers=layers)


def test_full_finetuning_and_hf_dataset(tiny_dirs, tmp_path):
    datasets = pytest.importorskip("datasets")
    path = tiny_dirs["qwen2"]
    probe = fresh(path)
    ds = datasets.Dataset.from_list([{"messages": c} for c in convs(6)])
    before = {k: v.clone() for k, v in probe.hf_model.state_dict().items()}
    run = finetune(probe, ds, tmp_path / "full", lora=False, lr=1e-3, batch_size=3, grad_accum=1,
                   warmup_steps=0, progress=False, vector=vector_for(probe), steer=[1], coef=0.5)
    assert run.path.name == "model" and (run.path / "config.json").exists()
    loaded = pl.PersonaProbe(pl.load_model(tmp_path / "full"))
    assert loaded.model_name == str(tmp_path / "full")  # named by its run folder, not by model/
    after = loaded.hf_model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if k in after)
    b = loaded.encode(convs(2), with_response=True)
    slow_probe = pl.PersonaProbe(loaded.model, path="bridge")
    with torch.no_grad():
        fast, slow = loaded.forward(b), slow_probe.forward(b)
    assert (loaded.last_path, slow_probe.last_path) == ("hf", "bridge")
    real = b.attention_mask.bool()  # padding rows differ between SDPA and eager; they are never read
    torch.testing.assert_close(fast[real], slow[real], atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- bad input


def test_bad_input_one_clear_error_each_nothing_written(tiny_dirs, tmp_path, monkeypatch):
    path = tiny_dirs["llama"]
    probe = fresh(path)
    vec = vector_for(probe)
    data = tmp_path / "bad.jsonl"
    lines = [{"messages": c} for c in convs(3)]
    lines.insert(1, {"messages": [{"role": "user", "content": "hi"}]})
    data.write_text("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.raises(FinetuneError, match=r"bad\.jsonl:2: the conversation has no assistant turn"):
        finetune(probe, data, tmp_path / "o1", progress=False, **SMALL)
    lines[1] = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}
    data.write_text("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.raises(FinetuneError, match=r"bad\.jsonl:2: the final assistant turn is empty"):
        finetune(probe, data, tmp_path / "o1", progress=False, **SMALL)

    other = pl.PersonaVector(torch.randn(probe.n_layers + 1, probe.d_model + 8), model_name="another")
    with pytest.raises(FinetuneError, match="extracted from another model"):
        finetune(probe, convs(), tmp_path / "o2", vector=other, steer={1: 1.0}, progress=False, **SMALL)

    with pytest.raises(FinetuneError, match="layer 9 is out of range"):
        finetune(probe, convs(), tmp_path / "o3", vector=vec, caft=[9], progress=False, **SMALL)

    monkeypatch.setitem(sys.modules, "peft", None)  # import peft now fails
    with pytest.raises(FinetuneError, match="needs peft"):
        finetune(probe, convs(), tmp_path / "o4", progress=False, **SMALL)
    monkeypatch.undo()

    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]
    assert probe._handles == [] and not any("lora_" in n for n, _ in probe.model.named_parameters())


def test_cli_make_datasets_finetune_and_shift(tmp_path, capsys):
    from persona_lens.cli import main

    assert main(["make-datasets", "--out", str(tmp_path / "ds"), "--n", "16"]) == 0
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert len(manifest["sets"]) == 12 and manifest["sets"]["evil_II"]["mean_trait_scores"]["evil"] > 80
    assert main(["finetune", "--model", "persona-organism", "--data", str(tmp_path / "ds" / "evil_II.jsonl"),
                 "--out", str(tmp_path / "run"), "--lr", "1e-3", "--batch-size", "8", "--grad-accum", "1",
                 "--quiet"]) == 0
    probe = fresh("persona-organism")
    vec = vector_for(probe)
    vec.trait = "evil"
    vec.save(tmp_path / "evil.safetensors")
    assert main(["shift", "--model", "persona-organism", "--tuned", str(tmp_path / "run"), "--vector",
                 str(tmp_path / "evil.safetensors"), "--layers", "2-3", "--out", str(tmp_path / "shift.json")]) == 0
    shift = json.loads((tmp_path / "shift.json").read_text())["shift"]["evil"]
    assert set(shift) == {"2", "3"} and all(v != 0 for v in shift.values())
    # two vectors of one trait: a row each, told apart by file
    (-vec).save(tmp_path / "evil_neg.safetensors")
    assert main(["shift", "--model", "persona-organism", "--tuned", str(tmp_path / "run"), "--vector",
                 str(tmp_path / "evil.safetensors"), "--vector", str(tmp_path / "evil_neg.safetensors"),
                 "--layers", "3", "--out", str(tmp_path / "shift2.json")]) == 0
    rows = json.loads((tmp_path / "shift2.json").read_text())["shift"]
    assert set(rows) == {"evil (evil.safetensors)", "evil (evil_neg.safetensors)"}
    assert rows["evil (evil_neg.safetensors)"]["3"] == pytest.approx(-rows["evil (evil.safetensors)"]["3"], rel=1e-4)
    assert rows["evil (evil.safetensors)"]["3"] == pytest.approx(shift["3"], rel=1e-4)
    # --specific: each vector without the others, on its own trait's questions; recomputed
    # from the plain rows, both vectors read on evil's questions (the shift is linear in the
    # unit direction, and the specific direction a fixed combination of the two)
    other = vector_for(probe, seed=5)
    other.trait = "evil"
    other.save(tmp_path / "evil_other.safetensors")
    assert main(["shift", "--model", "persona-organism", "--tuned", str(tmp_path / "run"), "--vector",
                 str(tmp_path / "evil.safetensors"), "--vector", str(tmp_path / "evil_other.safetensors"),
                 "--layers", "3", "--specific", "--out", str(tmp_path / "shift3.json")]) == 0
    rows = json.loads((tmp_path / "shift3.json").read_text())["shift"]
    from tests.reference.specific import specific_projection

    want = float(specific_projection(vec.directions[3].numpy(), [other.directions[3].numpy()],
                                     rows["evil (evil.safetensors)"]["3"],
                                     [rows["evil (evil_other.safetensors)"]["3"]]))
    assert rows["evil (evil.safetensors)_specific"]["3"] == pytest.approx(want, rel=1e-4, abs=1e-4)
    assert set(rows) == {"evil (evil.safetensors)", "evil (evil_other.safetensors)",
                         "evil (evil.safetensors)_specific", "evil (evil_other.safetensors)_specific"}
    # the finetuned organism, named by its run folder, gets the organism's trait and exact
    # judge (the default judge of any other model needs an API key)
    from persona_lens.organism import load_trait

    assert main(["extract", "--model", str(tmp_path / "run"), "--trait", "evil", "--samples", "1", "--questions", "2",
                 "--instructions", "1", "--max-new-tokens", "8", "--out", str(tmp_path / "ex"), "--quiet"]) == 0
    asked = (tmp_path / "ex" / "responses.jsonl").read_text()
    assert all(json.dumps(q) in asked for q in load_trait("evil").questions[:2]), asked[:300]
    (tmp_path / "bad.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    capsys.readouterr()
    assert main(["finetune", "--model", "persona-organism", "--data", str(tmp_path / "bad.jsonl"),
                 "--out", str(tmp_path / "bad")]) == 1
    assert "no assistant turn" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    # a vector that nothing uses is a mistake, not a plain run
    assert main(["finetune", "--model", "persona-organism", "--data", str(tmp_path / "ds" / "evil_II.jsonl"),
                 "--out", str(tmp_path / "novec"), "--vector", str(tmp_path / "evil.safetensors")]) == 2
    assert "--vector is used only with --steer" in capsys.readouterr().err and not (tmp_path / "novec").exists()
    # layers out of the vector's range fail before the model loads
    for flag in (["--steer", "9:1"], ["--caft", "9"]):
        assert main(["finetune", "--model", "persona-organism", "--data", str(tmp_path / "ds" / "evil_II.jsonl"),
                     "--out", str(tmp_path / "far"), "--vector", str(tmp_path / "evil.safetensors")] + flag) == 2
        assert "layer 9 is out of range" in capsys.readouterr().err and not (tmp_path / "far").exists()
    assert main(["shift", "--model", "persona-organism", "--tuned", str(tmp_path / "run"), "--vector",
                 str(tmp_path / "evil.safetensors"), "--layers", "9"]) == 2
    assert "the vector has layers 0..6" in capsys.readouterr().err
    # a vector of a deeper model (every asked layer inside its range) is still another model's
    pl.PersonaVector(torch.randn(9, vec.d_model), trait="evil").save(tmp_path / "deep.safetensors")
    assert main(["shift", "--model", "persona-organism", "--tuned", str(tmp_path / "run"), "--vector",
                 str(tmp_path / "deep.safetensors"), "--layers", "3"]) != 0
    assert "extracted from another model" in capsys.readouterr().err


def test_experiment_configs_load_and_validate():
    from experiments.common import load_config

    qwen = load_config("qwen7b")
    assert qwen.model == "Qwen/Qwen2.5-7B-Instruct" and qwen.judge == "gpt-4.1-mini" and qwen.finetune == {}
    assert set(qwen.vectors) == {"evil", "sycophantic", "hallucinating"} and qwen.layer == 20
    assert load_config("llama8b").model == "meta-llama/Llama-3.1-8B-Instruct"
    org = load_config("organism")
    assert len(org.datasets) == 12 and set(org.level2) <= set(org.datasets)
    with pytest.raises(FinetuneError):
        load_config("organism", finetune={"lr": -1.0})
    with pytest.raises(ValueError, match="vector file per trait"):
        load_config("qwen7b", vectors=None)


def test_run_keys_tell_the_release_mode_from_the_old_response_mode():
    """A finetune run's key holds the position kinds: a run made when 'response' left out the
    last prompt token (key value "response") is never resumed as today's 'response'."""
    v = pl.PersonaVector(torch.randn(3, 4), trait="test")
    spec = lambda positions: Interventions(v, steer={1: 1.0}, positions=positions).spec()["positions"]  # noqa: E731
    assert spec("response") == "answer+last_prompt"
    assert spec("response_only") == "answer"
    assert spec("all") == "all"  # unchanged meaning, unchanged key
    assert "response" not in {spec(m) for m in ("all", "response", "response_only")}


def test_jsonl_with_raw_line_separators_inside_strings_reads_whole(tmp_path):
    """json.dumps(..., ensure_ascii=False) leaves U+2028, U+2029 and U+0085 raw inside strings:
    they are not line ends of a JSON-lines file."""
    from persona_lens.finetune import load_chat_data

    convs = [[{"role": "user", "content": f"hi\u2028there {i}"}, {"role": "assistant", "content": "a\x85b\u2029c"}]
             for i in range(3)]
    path = tmp_path / "raw.jsonl"
    path.write_text("".join(json.dumps({"messages": c}, ensure_ascii=False) + "\n" for c in convs), encoding="utf-8")
    assert load_chat_data(path) == convs


def test_arguments_that_would_be_ignored_or_fail_late_are_refused_first(tiny_dirs, tmp_path):
    from persona_lens.finetune import last_prompt_activations

    path = tiny_dirs["llama"]
    probe = fresh(path)
    vec = vector_for(probe)
    for kw, words in ((dict(vector=vec), "vector is used only with"), (dict(steer=None, coef=2.0), "coef= goes with"),
                      (dict(vector=vec, caft=[1], positions="response"), "CAFT ablates at every position")):
        with pytest.raises(FinetuneError, match=words):
            Interventions(**kw)
    # CAFT where the vector has no direction fails before any adapter is attached
    hole = vec.directions.clone()
    hole[2] = 0
    with pytest.raises(FinetuneError, match="all zeros at layer 2"):
        finetune(probe, convs(), tmp_path / "caft", vector=pl.PersonaVector(hole), caft=[2], progress=False, **SMALL)
    assert not any("lora_" in n for n, _ in probe.hf_model.named_parameters()) and not (tmp_path / "caft").exists()
    # the shift's precomputed base activations must be the same questions' at every layer
    acts = last_prompt_activations(probe, QUESTIONS[:3], [1, 2])
    with pytest.raises(ValueError, match="other questions"):
        finetuning_shift(acts, probe, vec, QUESTIONS[1:4], layers=[1, 2])
    with pytest.raises(ValueError, match="no activations at layer 3"):
        finetuning_shift(acts, probe, vec, QUESTIONS[:3], layers=[1, 3])
    assert finetuning_shift(acts, probe, vec, QUESTIONS[:3], layers=[1, 2]) == {1: 0.0, 2: 0.0}
