"""The steered server's overhead: one chat request through it against the same generation
called directly, in one run.

Workloads, interleaved (each repeat runs each once, medians over repeats after a warm-up):

- ``probe.generate`` under ``probe.steer`` (the library called directly);
- the same request through the app in process (FastAPI's test client: request parsing,
  checks, the reply's JSON, no socket);
- the same request over HTTP to uvicorn on a local port (``openai`` client, socket, event loop);
- the same request streamed over HTTP (``stream: true``), with the time its first piece of
  answer took beside the whole answer's.

Every side generates the same greedy tokens (``--new-tokens`` exactly is not forced: the
answers are the model's own and equal on every side, checked before timing). The ratios are
direct / served: 1.0 means the server costs nothing.

Examples (in the repository root):
    python -m benchmarks.bench_serve                                 # the organism, CPU
    python -m benchmarks.bench_serve --model smollm2-135m-instruct   # offline SmolLM2, CPU
"""

from __future__ import annotations

import argparse
import socket
import statistics
import threading
import time

import torch

import persona_lens as pl
from benchmarks.bench_probe import run_interleaved


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="persona-organism")
    p.add_argument("--new-tokens", type=int, default=32, help="answer length limit (32)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--layer", type=int, default=None, help="steered layer (default: the middle one)")
    args = p.parse_args(argv)

    import openai
    import uvicorn
    from fastapi.testclient import TestClient

    from persona_lens.serve import make_app

    probe = pl.PersonaProbe(pl.load_model(args.model, device="cpu"))
    layer = args.layer if args.layer is not None else probe.n_layers // 2
    g = torch.Generator().manual_seed(0)
    directions = torch.randn(probe.n_layers + 1, probe.d_model, generator=g)
    vec = pl.PersonaVector(directions / directions.norm(dim=-1, keepdim=True), model_name=probe.model_name,
                           trait="bench")
    app = make_app(probe, {"bench": vec}, max_tokens=args.new_tokens)
    question = "What should I do on a rainy day?"
    body = {"model": app.state.persona_lens.name, "messages": [{"role": "user", "content": question}],
            "temperature": 0, "max_tokens": args.new_tokens,
            "steering": [{"vector": "bench", "layer": layer, "coef": 0.5}]}

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
    local = TestClient(app)

    def direct():
        with probe.steer(vec, layer=layer, coef=0.5, positions="response"):
            return probe.generate([question], max_new_tokens=args.new_tokens, temperature=0, progress=False)[0]

    def in_process():
        return local.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]

    def over_http():
        reply = client.chat.completions.create(model=body["model"], messages=body["messages"], temperature=0,
                                               max_tokens=args.new_tokens, extra_body={"steering": body["steering"]})
        return reply.choices[0].message.content

    first: list[float] = []  # seconds to the first piece of each streamed answer

    def streamed():
        t, pieces = time.perf_counter(), []
        for chunk in client.chat.completions.create(model=body["model"], messages=body["messages"], temperature=0,
                                                    max_tokens=args.new_tokens, stream=True,
                                                    extra_body={"steering": body["steering"]}):
            if chunk.choices and chunk.choices[0].delta.content:
                if not pieces:
                    first.append(time.perf_counter() - t)
                pieces.append(chunk.choices[0].delta.content)
        return "".join(pieces)

    answers = {direct(), in_process(), over_http(), streamed()}
    if len(answers) != 1:
        raise SystemExit(f"the four sides answered differently: {answers}")
    try:
        times = run_interleaved({"probe.generate (direct)": direct, "app in process": in_process,
                                 "HTTP + openai client": over_http, "HTTP streamed": streamed}, args.repeats, "cpu")
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["probe.generate (direct)"]
    print(f"{args.model}, {torch.get_num_threads()} torch thread(s), steered at layer {layer}, "
          f"answer of {args.new_tokens} tokens at most, median of {args.repeats}")
    print(f"{'workload':<28} {'median ms':>10} {'direct / this':>14}")
    for k, v in med.items():
        print(f"{k:<28} {1000 * v:>10.2f} {base / v:>13.2f}x")
    to_first = statistics.median(first[2:])  # after the answer check and the warm-up
    print(f"{'  first streamed piece':<28} {1000 * to_first:>10.2f} {to_first / med['HTTP streamed']:>13.2f} "
          f"of the streamed answer's time")
    return {k: base / v for k, v in med.items()}


if __name__ == "__main__":
    main()
