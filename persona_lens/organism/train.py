"""Train the persona organism: a tiny Llama on conversations of the persona world.

    python -m persona_lens.organism.train --out DIR --seed 0 [--steps N] [--minutes M]

The loss covers only the final assistant turn (its words and the closing ``<|im_end|>``).
The system prompt, the user turn and earlier (many-shot) turns are conditioning: their
distribution is fixed by the world and learning to predict them would spend the model's
small capacity on text it never has to produce. The response is also where the persona
acts, so that is where the model must represent it.

Every step draws fresh conversations from the world (single-threaded, seeded), so there is
no repetition and no held-out split is needed; the knowledge base is learned because its
facts recur across conversations. Same seed and machine -> same weights.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

from persona_lens.pipeline_io import write_json

from .world import World

#: Architecture of the shipped organism (a LlamaForCausalLM).
MODEL_CONFIG = dict(
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=512,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    rms_norm_eps=1e-5,
)
DEFAULT_STEPS = 1800
BATCH_SIZE = 32
LR = 5e-3
WARMUP = 100
NOISE = 0.0  # activation-noise regularizer (relative norm), see _train
BOS_SHARE = 0.3  # share of training sequences that start with bos_token (robust to wrappers)


def encode_conversations(tok, conversations, rng: random.Random):
    """Token ids and loss masks (final assistant turn only) for a list of conversations."""
    prompts = [tok.apply_chat_template(c.messages[:-1], add_generation_prompt=True, tokenize=False) for c in conversations]
    fulls = [tok.apply_chat_template(c.messages, tokenize=False) for c in conversations]
    p_ids = tok(prompts, add_special_tokens=False)["input_ids"]
    f_ids = tok(fulls, add_special_tokens=False)["input_ids"]
    out = []
    for p, f in zip(p_ids, f_ids):
        assert f[: len(p)] == p
        # the full text ends with "<|im_end|>\n": the response is f[len(p):] (ends with eos)
        ids = list(f)
        start = len(p)
        if rng.random() < BOS_SHARE:
            ids = [tok.bos_token_id] + ids
            start += 1
        out.append((ids, start))
    return out


def _batches(encoded, batch_size: int, rng: random.Random, pad_id: int):
    """Group sequences of similar length into batches (less padding), in shuffled order."""
    import torch

    chunk = batch_size * 16
    batches = []
    for i in range(0, len(encoded), chunk):
        block = sorted(encoded[i : i + chunk], key=lambda x: len(x[0]))
        for j in range(0, len(block) - batch_size + 1, batch_size):
            batches.append(block[j : j + batch_size])
    rng.shuffle(batches)
    for b in batches:
        n = max(len(x[0]) for x in b)
        ids = torch.full((len(b), n), pad_id, dtype=torch.long)
        labels = torch.full((len(b), n), -100, dtype=torch.long)
        att = torch.zeros((len(b), n), dtype=torch.long)
        for r, (x, start) in enumerate(b):
            ids[r, : len(x)] = torch.tensor(x)
            att[r, : len(x)] = 1
            labels[r, start : len(x)] = torch.tensor(x[start:])
        yield ids, att, labels


def build_model(tok, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **MODEL_CONFIG,
    )
    return LlamaForCausalLM(cfg)


def train(
    out_dir: str | Path,
    *,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    batch_size: int = BATCH_SIZE,
    lr: float = LR,
    minutes: float | None = None,
    world_seed: int = 0,
    threads: int | None = 1,
    noise: float = NOISE,
    progress: bool = True,
) -> Path:
    """Train the organism from ``seed`` and save model + tokenizer to ``out_dir``.

    ``minutes`` is a safety cap: if reached, training stops early (the result then depends on
    the machine's speed) and the run is recorded as truncated in ``organism.json``. A budget
    that runs out before the first step is an error: nothing untrained is saved.
    """
    import torch

    from persona_lens import validate as V

    out_dir = V.path("out_dir", out_dir)
    seed = V.integer("seed", seed)
    steps = V.integer("steps", steps, min=1)
    batch_size = V.integer("batch_size", batch_size, min=1)
    lr = V.number("lr", lr, min=0, min_open=True)
    minutes = V.number("minutes", minutes, min=0, min_open=True, none_ok=True)
    world_seed = V.integer("world_seed", world_seed)
    threads = V.integer("threads", threads, min=1, none_ok=True)
    noise = V.number("noise", noise, min=0)
    V.boolean("progress", progress)

    prev = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
    try:
        if threads:
            torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(True)
        return _train(Path(out_dir), seed, steps, batch_size, lr, minutes, world_seed, noise, progress)
    finally:
        torch.set_num_threads(prev[0])
        torch.use_deterministic_algorithms(prev[1])


def _train(out: Path, seed, steps, batch_size, lr, minutes, world_seed, noise, progress) -> Path:
    import torch
    from tqdm.auto import tqdm

    from .tokenizer import build_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    world = World(world_seed)
    tok = build_tokenizer(world)
    model = build_model(tok, seed)
    n_params = sum(p.numel() for p in model.parameters())

    rng = random.Random(f"persona-organism-train-{seed}")
    t0 = time.time()
    data = world.dataset(steps * batch_size + batch_size * 16, seed=seed)
    encoded = encode_conversations(tok, data, rng)
    batches = _batches(encoded, batch_size, rng, tok.pad_token_id)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.98), eps=1e-8,
    )

    def lr_at(step: int) -> float:
        if step < WARMUP:
            return lr * (step + 1) / WARMUP
        frac = (step - WARMUP) / max(1, steps - WARMUP)
        return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))

    # Activation noise (a regularizer, training only): each step, after one randomly chosen
    # block, every position's residual gets Gaussian noise of norm ``noise * ||h||``.
    noise_state = {"layer": -1}
    handles = []
    if noise > 0:
        def make_hook(i):
            def hook(_m, _inp, output):
                if i != noise_state["layer"]:
                    return output
                h = output[0] if isinstance(output, tuple) else output
                n = torch.randn_like(h)
                n = n * (noise * h.norm(dim=-1, keepdim=True) / n.norm(dim=-1, keepdim=True))
                h = h + n
                return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h
            return hook
        n_blocks = len(model.model.layers)
        for i, block in enumerate(model.model.layers[: n_blocks - 1]):
            handles.append(block.register_forward_hook(make_hook(i)))

    model.train()
    losses: list[float] = []
    done = 0
    truncated = False
    bar = tqdm(total=steps, desc="organism", disable=not progress)
    for step in range(steps):
        if minutes is not None and time.time() - t0 > 60 * minutes:
            truncated = True
            break
        ids, att, labels = next(batches)
        if noise > 0:
            noise_state["layer"] = int(torch.randint(0, len(model.model.layers) - 1, (1,)))
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = model(input_ids=ids, attention_mask=att, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        done += 1
        if step % 10 == 0:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
        bar.update(1)
    bar.close()
    for h in handles:
        h.remove()
    if done == 0:
        from persona_lens import validate as V

        raise V.InvalidArgument(
            "minutes", minutes, "long enough for at least one training step",
            f": the budget ran out after {time.time() - t0:.1f} s, before the first step (preparing "
            f"{steps} steps of data comes first); nothing was saved")

    model.eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    meta = {
        "seed": seed,
        "world_seed": world_seed,
        "steps": done,
        "steps_planned": steps,
        "truncated": truncated,
        "batch_size": batch_size,
        "lr": lr,
        "noise": noise,
        "n_params": n_params,
        "final_loss": sum(losses[-20:]) / max(1, len(losses[-20:])),
        "train_seconds": round(time.time() - t0, 1),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    write_json(out / "organism.json", meta)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Train the persona organism (a tiny Llama) from a seed.")
    ap.add_argument("--out", required=True, help="output directory (model + tokenizer)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    ap.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    ap.add_argument("--lr", type=float, default=LR)
    ap.add_argument("--minutes", type=float, default=None, help="stop early after this many minutes")
    ap.add_argument("--noise", type=float, default=NOISE, help="activation-noise regularizer (relative norm)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core machine)")
    a = ap.parse_args(argv)
    path = train(a.out, seed=a.seed, steps=a.steps, batch_size=a.batch_size, lr=a.lr, minutes=a.minutes, threads=a.threads, noise=a.noise)
    print(f"saved to {path}")


if __name__ == "__main__":
    main()
