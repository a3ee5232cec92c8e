"""The GPU benchmarks' own code paths, at toy size on the CPU.

A GPU machine is at hand only now and then, for minutes, so ``benchmarks/gpu_suite.sh`` must
work the first time it runs there: each of its benchmarks runs here on the 4-layer model of the
same architecture (``--random-qwen-tiny``, the flag that stands in for ``--random-qwen7b``),
and its table must come out whole. Timings are not asserted (benchmarks print ratios; tests
never time), only that each script runs and reports what its docs quote.
"""

from __future__ import annotations

import json
import re

import pytest
import torch


def test_random_model_greedy_tokens_decode_to_text():
    """The random model's output rows beyond the tokenizer are zeroed so that greedy tokens
    are the tokenizer's own (screening needs non-empty base responses)."""
    from benchmarks.random_models import random_qwen

    bridge, plain = random_qwen("cpu", torch.float32, tiny=True)
    n_tok = len(bridge.tokenizer)
    ids = torch.tensor([[1, 5, 9, 11]])
    out = plain.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    assert (out[0, 4:] < n_tok).all()
    assert torch.equal(plain.lm_head.weight, bridge.original_model.lm_head.weight)  # same weights


def test_finetune_benchmark_prints_each_workload(capsys):
    from benchmarks import bench_finetune

    bench_finetune.main(["--random-qwen-tiny", "--batch", "2", "--repeats", "1"])
    out = capsys.readouterr().out
    for workload in ("plain LoRA step", "+ preventative steering", "+ CAFT"):
        assert re.search(rf"{re.escape(workload)}.*\d+\.\d+x", out), out


def test_screen_benchmark_reports_both_ratios(tmp_path, capsys):
    from benchmarks import bench_screen

    path = tmp_path / "screen.json"
    bench_screen.main(["--random-qwen-tiny", "--samples", "8", "--batch", "4", "--new-tokens", "8",
                       "--repeats", "1", "--skip", "memory", "--json", str(path)])
    t = json.loads(path.read_text())["throughput"]
    assert t["conversations_forwarded"] == 16 and t["tokens_forwarded"] > 0
    assert t["projection_vs_hf_forward"] > 0 and t["generation_vs_probe_generate"] > 0
    assert "projection pass" in capsys.readouterr().out


def test_serve_benchmark_checks_the_answers_agree_and_prints_ratios(capsys):
    pytest.importorskip("fastapi")
    from benchmarks import bench_serve

    ratios = bench_serve.main(["--new-tokens", "4", "--repeats", "1"])
    assert set(ratios) == {"probe.generate (direct)", "app in process", "HTTP + openai client", "HTTP streamed"}
    assert all(r > 0 for r in ratios.values())
    out = capsys.readouterr().out
    assert "HTTP + openai client" in out and "first streamed piece" in out
