"""Supervised finetuning with persona-vector interventions, and the finetuning shift.

:func:`finetune` trains the probe's model on chat data (a JSONL file of ``{"messages": [...]}``
lines, the released datasets' format, a list of conversations, or an HF ``datasets.Dataset``),
with the loss on the final assistant turn only (its tokens and the end-of-turn token). It
trains LoRA adapters through peft (the release's settings by default, :class:`FinetuneConfig`)
or every weight (``lora=False``). Two interventions can act on every training forward and are
gone afterwards:

- preventative steering: ``h_L <- h_L + coef * v_L`` (the raw vector) at one or several layers,
  at every position (as released) or at the response tokens only;
- CAFT: ``h_L <- h_L - (h_L . u_L) u_L`` at every position, ``u_L`` the unit vector.

Runs are seeded and deterministic on the CPU (one thread, deterministic algorithms, data
order from the seed); a checkpoint every ``save_every`` steps lets a killed run resume to the
same weights. The output folder holds the adapter in peft's format (``adapter/``, loadable
by ``peft.PeftModel.from_pretrained`` on the plain HF model, and by
``persona_lens.load_model(out_dir)``) or the full model (``model/``), and ``finetune.json``
with the run's settings (data hash, vector file hash, layers, coefficients) and losses.

:func:`finetuning_shift` is the paper's shift: the mean over evaluation questions of
``(a_tuned - a_base) . u_L``, ``a`` the last-prompt-token activation (no system prompt) at
layer ``L``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import torch

from persona_lens import validate as V
from persona_lens.chat import ChatBatch, as_conversation, chat_rows, encode_rows
from persona_lens.interventions import position_kinds
from persona_lens.ops import STEERING_MODES
from persona_lens.models import attach_lora
from persona_lens.pipeline_io import _UMASK, atomic_path, fingerprint, read_json, write_json
from persona_lens.progress import quiet as _quiet
from persona_lens.vectors import PersonaVector, check_layers

if TYPE_CHECKING:
    from persona_lens.probe import PersonaProbe

__all__ = [
    "FinetuneConfig", "FinetuneError", "FinetuneResult", "Interventions", "finetune",
    "finetuning_shift", "load_chat_data", "data_hash", "LORA_TARGETS",
]

#: The release's LoRA targets: every attention and MLP projection.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: Files of a finished run.
SETTINGS_FILE = "finetune.json"
ADAPTER_DIR = "adapter"
MODEL_DIR = "model"
CHECKPOINT_FILE = "checkpoint.pt"


class FinetuneError(ValueError):
    """Finetuning input the user can fix: a bad dataset line, vector, layer or setting."""


@contextlib.contextmanager
def _as_finetune_error():
    """A bad argument (``persona_lens.validate``) reported as a FinetuneError, same words."""
    try:
        yield
    except V.InvalidArgument as e:
        raise FinetuneError(str(e)) from None


@dataclass(frozen=True)
class FinetuneConfig:
    """Training settings. The defaults are the released code's (LoRA r=32, alpha=64, rsLoRA,
    every attention and MLP projection, lr 1e-5, 1 epoch, linear schedule, 5 warmup steps,
    2 conversations per forward x 8 accumulated = 16 per optimizer step, weight decay 0.01).

    Example:
        >>> FinetuneConfig().r, FinetuneConfig().lr
        (32, 1e-05)
        >>> FinetuneConfig(lora=False, lr=1e-3).lora
        False
    """

    lora: bool = True
    r: int = 32
    alpha: float = 64.0
    rslora: bool = True
    dropout: float = 0.0
    target_modules: tuple[str, ...] = LORA_TARGETS
    lr: float = 1e-5
    epochs: int = 1
    batch_size: int = 2
    grad_accum: int = 8
    warmup_steps: int = 5
    schedule: str = "linear"  # linear decay to 0 after warmup, or "constant"
    weight_decay: float = 0.01
    max_length: int = 2048
    max_steps: int | None = None  # stop after this many optimizer steps (None: all epochs)
    seed: int = 0
    save_every: int = 50  # checkpoint every N optimizer steps (0: never)
    threads: int | None = 1  # torch threads while training (None: leave as is)
    deterministic: bool = True

    def __post_init__(self) -> None:
        with _as_finetune_error():
            set_ = object.__setattr__
            targets = V.items("target_modules", self.target_modules, what="a list of module names", nonempty=True)
            set_(self, "target_modules", tuple(V.text(f"target_modules[{i}]", t, empty_ok=False)
                                               for i, t in enumerate(targets)))
            for name in ("lora", "rslora", "deterministic"):
                set_(self, name, V.boolean(name, getattr(self, name)))
            for name in ("r", "epochs", "batch_size", "grad_accum", "max_length"):
                set_(self, name, V.integer(name, getattr(self, name), min=1))
            for name in ("warmup_steps", "save_every"):
                set_(self, name, V.integer(name, getattr(self, name), min=0))
            set_(self, "max_steps", V.integer("max_steps", self.max_steps, min=1, none_ok=True))
            set_(self, "threads", V.integer("threads", self.threads, min=1, none_ok=True))
            set_(self, "seed", V.integer("seed", self.seed, min=0, max=2**63 - 1))
            set_(self, "alpha", V.number("alpha", self.alpha, min=0, min_open=True))
            set_(self, "lr", V.number("lr", self.lr, min=0, min_open=True))
            set_(self, "dropout", V.number("dropout", self.dropout, min=0, max=1, max_open=True))
            set_(self, "weight_decay", V.number("weight_decay", self.weight_decay, min=0))
            V.choice("schedule", self.schedule, ("linear", "constant"))

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "FinetuneConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class Interventions:
    """What acts on every training forward: preventative steering and/or CAFT ablation.

    Args:
        vector: a :class:`PersonaVector` or the path of a saved one.
        steer: ``{layer: coef}`` (or a list of layers sharing ``coef``): add ``coef * v_L``.
        coef: the coefficient for a list of layers (default 1.0; not with a dict).
        positions: a steering mode of :meth:`PersonaProbe.steer`: ``"all"`` (as released),
            ``"response"`` (the last prompt token and the answer tokens) or
            ``"response_only"`` (the answer tokens).
        caft: layers at which the direction is projected out (CAFT).

    Example:
        >>> iv = Interventions(vec, steer={2: 1.5})
        >>> iv.spec()["steer"], iv.spec()["caft"]
        ([[2, 1.5]], [])
    """

    vector: PersonaVector | str | os.PathLike | None = None
    steer: Mapping[int, float] | Sequence[int] | None = None
    coef: float | None = None
    positions: str = "all"
    caft: Sequence[int] | None = None
    vector_file_hash: str | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if isinstance(self.vector, (str, os.PathLike)):
            path = Path(self.vector)
            if not path.exists():
                raise FinetuneError(f"vector file {path} does not exist")
            self.vector_file_hash = hashlib.sha256(path.read_bytes()).hexdigest()
            self.vector = PersonaVector.load(path)
        elif isinstance(self.vector, PersonaVector):
            raw = self.vector.directions.detach().float().contiguous().numpy().tobytes()
            self.vector_file_hash = "tensor:" + hashlib.sha256(raw).hexdigest()
        elif self.vector is not None:
            raise FinetuneError(f"vector must be a PersonaVector or a file, got {type(self.vector).__name__}")
        with _as_finetune_error():
            if isinstance(self.steer, Mapping) and self.coef is not None:  # it would be ignored
                raise V.InvalidArgument("coef", self.coef, "left out with steer={layer: coef} (each layer carries "
                                        "its own coefficient; coef= goes with a list of layers)")
            if self.steer is not None and not isinstance(self.steer, Mapping):
                coef = V.number("coef", 1.0 if self.coef is None else self.coef)
                layers = [self.steer] if isinstance(self.steer, int) else V.items(
                    "steer", self.steer, what="a {layer: coef} dict, a list of layers or one layer")
                self.steer = {V.integer(f"steer[{i}]", l, min=0): coef for i, l in enumerate(layers)}
            self.steer = {V.integer("steer key", l, min=0): V.number(f"steer[{l!r}]", c)
                          for l, c in (self.steer or {}).items()}
            caft = [self.caft] if isinstance(self.caft, int) else V.items("caft", self.caft or [])
            self.caft = sorted({V.integer(f"caft[{i}]", l, min=0) for i, l in enumerate(caft)})
        if self.positions not in STEERING_MODES:
            raise FinetuneError(f"steering positions during training must be one of {', '.join(map(repr, STEERING_MODES))}, "
                                f"got {self.positions!r}")
        if (self.steer or self.caft) and self.vector is None:
            raise FinetuneError("preventative steering and CAFT need a vector")
        # Arguments that would be ignored are refused: each is a run other than the one asked for.
        if self.vector is not None and not (self.steer or self.caft):
            raise FinetuneError("a vector is used only with steer= (preventative steering) or caft=; give one of "
                                "them, or leave the vector out for plain finetuning")
        if not self.steer and self.coef is not None:
            raise FinetuneError("coef= goes with steer= (a list of layers); there is no steering here")
        if not self.steer and self.positions != "all":
            raise FinetuneError(f"positions={self.positions!r} says where steer= adds the vector; CAFT ablates at "
                                "every position and there is no steering here")

    @property
    def active(self) -> bool:
        return bool(self.steer or self.caft)

    def spec(self) -> dict[str, Any]:
        v = self.vector if isinstance(self.vector, PersonaVector) else None
        return {
            "vector_hash": self.vector_file_hash if self.active else None,
            "trait": v.trait if v is not None and self.active else None,
            "vector_model": v.model_name if v is not None and self.active else None,
            "steer": [[l, c] for l, c in sorted(self.steer.items())],
            # The kinds, not the mode's name: a run made when "response" left out the last
            # prompt token keeps a key of its own.
            "positions": "+".join(position_kinds(self.positions)) if self.steer else None,
            "caft": list(self.caft),
        }

    def check(self, probe: "PersonaProbe") -> None:
        """Raise unless the vector fits the model and every layer exists."""
        if not self.active:
            return
        try:
            self.vector.check_compatible(probe.n_layers, probe.d_model, None)
        except ValueError as e:
            raise FinetuneError(str(e)) from None
        for l in list(self.steer) + list(self.caft):
            try:
                probe.check_layer(l)
            except (ValueError, TypeError) as e:
                raise FinetuneError(str(e)) from None
        for l, c in self.steer.items():
            with _as_finetune_error():
                probe._check_steer_size(self.vector, l, c, f"steer[{l}]")
        for l in self.caft:  # before any adapter is attached: a late failure would leave the model changed
            if not bool(self.vector[l].any()):
                raise FinetuneError(f"caft: the vector is all zeros at layer {l} (extracted without it?): there is "
                                    "no direction to project out; choose a layer the vector has")

    @contextlib.contextmanager
    def applied(self, probe: "PersonaProbe", batch: Any):
        """The interventions on the forwards inside the block (the probe removes them after)."""
        with contextlib.ExitStack() as stack:
            if self.steer:
                stack.enter_context(probe.steer(self.vector, layers=self.steer, positions=self.positions))
            if self.caft:
                stack.enter_context(probe.ablate(self.vector, layers=self.caft))
            stack.enter_context(probe.batch(batch))
            yield


@dataclass
class FinetuneResult:
    """A finished run: its folder, settings (``finetune.json``) and losses."""

    out_dir: Path
    settings: dict[str, Any]
    #: True when the folder already held this finished run and nothing was trained
    reused: bool = False

    def __repr__(self) -> str:
        from persona_lens.display import finetune_repr

        return finetune_repr(self)

    @property
    def losses(self) -> list[float]:
        return self.settings["losses"]

    @property
    def path(self) -> Path:
        """What ``persona_lens.load_model`` takes: the adapter folder or the full model."""
        return self.out_dir / (ADAPTER_DIR if self.settings["config"]["lora"] else MODEL_DIR)


# ----------------------------------------------------------------------------- data


def load_chat_data(data: Any) -> list[list[dict[str, str]]]:
    """Conversations from a JSONL file (one ``{"messages": [...]}`` per line), a list of
    conversations / ``{"messages": ...}`` records, or an HF ``datasets.Dataset`` with a
    ``messages`` column. Every conversation must end with a non-empty assistant turn.

    Example:
        >>> path = tmp / "d.jsonl"
        >>> _ = path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi ?"},
        ...                                              {"role": "assistant", "content": "hello ."}]}) + "\\n")
        >>> load_chat_data(path)[0][-1]
        {'role': 'assistant', 'content': 'hello .'}
    """
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if not path.exists():
            raise FinetuneError(f"dataset {path} does not exist")
        records, where = [], []
        # split at "\n" only: JSON written with ensure_ascii=False keeps U+2028 / U+0085 raw inside
        # strings, and str.splitlines() would cut a line there
        for i, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise FinetuneError(f"{path}:{i}: not JSON ({e.msg})") from None
            where.append(f"{path}:{i}")
    else:
        if hasattr(data, "column_names") and "messages" not in getattr(data, "column_names", []):
            raise FinetuneError(f"the dataset has columns {data.column_names}, not 'messages'")
        records = list(data)
        where = [f"item {i}" for i in range(len(records))]
    if not records:
        raise FinetuneError("the dataset is empty")
    out = []
    for rec, at in zip(records, where):
        msgs = rec.get("messages") if isinstance(rec, Mapping) else rec
        if not isinstance(msgs, list) or not msgs:
            raise FinetuneError(f"{at}: expected a 'messages' list of chat turns")
        try:
            conv = as_conversation(msgs)
        except (TypeError, ValueError, KeyError) as e:
            raise FinetuneError(f"{at}: {e}") from None
        last = conv[-1]
        if last.get("role") != "assistant":
            raise FinetuneError(f"{at}: the conversation has no assistant turn to train on "
                                f"(it ends with a {last.get('role')!r} turn)")
        if not str(last.get("content", "")).strip():
            raise FinetuneError(f"{at}: the final assistant turn is empty: nothing to train on")
        out.append([{"role": m["role"], "content": m["content"]} for m in conv])
    return out


def data_hash(conversations: Sequence[Sequence[Mapping[str, str]]]) -> str:
    """A content hash of a dataset (order included)."""
    return hashlib.sha256(json.dumps(list(conversations), sort_keys=True).encode()).hexdigest()[:16]


def encode_training(tokenizer: Any, conversations: Sequence[Any], max_length: int) -> ChatBatch:
    """A left-padded batch whose response is the assistant turn plus the end-of-turn token."""
    rows = []
    eos = tokenizer.eos_token_id
    for p, r in chat_rows(tokenizer, conversations, with_response=True):
        r = list(r) + ([eos] if eos is not None else [])
        if len(p) >= max_length:
            raise FinetuneError(f"a prompt has {len(p)} tokens, max_length is {max_length}")
        rows.append((p, r[: max_length - len(p)]))
    return encode_rows(tokenizer, rows)


# ----------------------------------------------------------------------------- training


def _require_peft():
    try:
        import peft
    except ImportError:
        raise FinetuneError("LoRA finetuning needs peft: pip install peft (or use lora=False "
                            "for full finetuning)") from None
    return peft


def bridge_lora_config(config: FinetuneConfig, targets: Sequence[str] | None = None):
    """peft's LoraConfig for a TransformerBridge's HF model (linear layers one level down)."""
    peft = _require_peft()
    names = "|".join(targets or config.target_modules)
    return peft.LoraConfig(
        r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, use_rslora=config.rslora,
        target_modules=rf".*\.({names})\._original_component", bias="none",
    )


def plain_lora_config(config: FinetuneConfig, base: str, targets: Sequence[str]):
    """The same adapter described for the plain HF model (what peft, HF and vLLM load)."""
    peft = _require_peft()
    return peft.LoraConfig(
        r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, use_rslora=config.rslora,
        target_modules=list(targets), bias="none", base_model_name_or_path=base,
        task_type="CAUSAL_LM",
    )


def _clean(name: str) -> str:
    return name.replace("._original_component", "").replace("base_model.model.", "")


class FinetuneRun:
    """One finetuning run; :func:`finetune` is the way to use it (tests drive its steps)."""

    def __init__(self, probe: "PersonaProbe", data: Any, out_dir: str | os.PathLike,
                 config: FinetuneConfig, interventions: Interventions, progress: bool | None = None):
        self.probe, self.config, self.iv = probe, config, interventions
        self.out = Path(out_dir)
        self.progress = progress
        if config.lora:
            _require_peft()
        interventions.check(probe)
        self.conversations = load_chat_data(data)
        self.data_hash = data_hash(self.conversations)
        self.base = probe.model_name
        n_batches = math.ceil(len(self.conversations) / config.batch_size)
        self.steps_per_epoch = math.ceil(n_batches / config.grad_accum)
        total = self.steps_per_epoch * config.epochs
        self.total_steps = min(total, config.max_steps) if config.max_steps else total
        self.settings = {
            "format": "persona_lens.finetune/1",
            "base_model": self.base,
            "data_hash": self.data_hash,
            "n_examples": len(self.conversations),
            "config": config.to_json(),
            "interventions": interventions.spec(),
            "total_steps": self.total_steps,
        }
        self.key = fingerprint(self.settings)
        self.model = None

    # -- setup --------------------------------------------------------------------------
    def prepare(self) -> None:
        """Attach the adapters (or unfreeze every weight) and build optimizer and schedule."""
        torch.manual_seed(self.config.seed)
        probe = self.probe
        if self.config.lora:
            peft = _require_peft()
            hf = probe.model.original_model
            if isinstance(hf, peft.PeftModel) or any("lora_" in n for n, _ in hf.named_parameters()):
                raise FinetuneError("the model already has LoRA adapters; load a fresh model to finetune")
            present = {n.rsplit(".", 1)[-1] for n, _ in _clean_named(hf.named_modules())}
            self.targets = [t for t in self.config.target_modules if t in present]
            if not self.targets:
                raise FinetuneError(f"none of the target modules {list(self.config.target_modules)} "
                                    "is in this model")
            attach_lora(hf, bridge_lora_config(self.config, self.targets))
        self.model = probe.hf_model
        if not self.config.lora:
            for p in self.model.parameters():
                p.requires_grad_(True)
        self.params = {_clean(n): p for n, p in self.model.named_parameters() if p.requires_grad}
        if not self.params:
            raise FinetuneError("nothing to train: no parameter requires a gradient")
        decay = [p for n, p in self.params.items() if p.ndim >= 2]
        no_decay = [p for n, p in self.params.items() if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.config.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}], lr=self.config.lr)
        warm, total, linear = self.config.warmup_steps, self.total_steps, self.config.schedule == "linear"

        def factor(step: int) -> float:
            if warm and step < warm:
                return (step + 1) / (warm + 1)
            if not linear:
                return 1.0
            return max(0.0, (total - step) / max(1, total - warm))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
        self.model.train()

    def order(self, epoch: int) -> list[int]:
        idx = list(range(len(self.conversations)))
        random.Random(f"persona-lens-finetune-{self.config.seed}-{epoch}").shuffle(idx)
        return idx

    def micro_batches(self, step: int) -> list[list[int]]:
        """The conversations of each forward of optimizer step ``step`` (0-based)."""
        c = self.config
        epoch, within = divmod(step, self.steps_per_epoch)
        order = self.order(epoch)
        per_step = c.batch_size * c.grad_accum
        chunk = order[within * per_step : (within + 1) * per_step]
        return [chunk[i : i + c.batch_size] for i in range(0, len(chunk), c.batch_size)]

    def micro_step(self, batch: ChatBatch, scale: float = 1.0) -> torch.Tensor:
        """Forward (with the interventions) and backward on one batch; returns the loss."""
        batch = batch.to(self.probe.device)
        labels = batch.input_ids.masked_fill(~batch.response_mask, -100)
        with self.iv.applied(self.probe, batch):
            out = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels)
            (out.loss * scale).backward()
        return out.loss.detach()

    def optimizer_step(self, step: int) -> float:
        groups = self.micro_batches(step)
        n = sum(len(g) for g in groups)
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for g in groups:
            batch = encode_training(self.probe.tokenizer, [self.conversations[i] for i in g], self.config.max_length)
            total += float(self.micro_step(batch, scale=len(g) / n)) * len(g) / n
        self.optimizer.step()
        self.scheduler.step()
        return total

    # -- checkpoints --------------------------------------------------------------------
    def save_checkpoint(self, step: int, losses: list[float]) -> None:
        state = {
            "key": self.key, "step": step, "losses": losses,
            "params": {n: p.detach().cpu().clone() for n, p in self.params.items()},
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "rng": torch.get_rng_state(),
        }
        with atomic_path(self.out / CHECKPOINT_FILE) as tmp:  # a temporary name of its own
            torch.save(state, tmp)

    def load_checkpoint(self) -> tuple[int, list[float]]:
        path = self.out / CHECKPOINT_FILE
        if not path.exists():
            return 0, []
        try:
            state = torch.load(path, weights_only=False)
        except Exception as e:  # a checkpoint cut short or not ours
            raise FinetuneError(f"{path} cannot be read as a checkpoint ({type(e).__name__}: {e}); delete it "
                                "to start the run over") from None
        if not isinstance(state, dict) or state.get("key") != self.key:
            raise FinetuneError(f"{path} is a checkpoint of another run (other data or settings); "
                                "use another output folder or delete it")
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(state["params"][n])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        return int(state["step"]), list(state["losses"])

    # -- the run ------------------------------------------------------------------------
    def run(self) -> FinetuneResult:
        done = self.out / SETTINGS_FILE
        if done.exists():
            settings = read_json(done)
            if settings.get("key") != self.key:
                raise FinetuneError(f"{self.out} holds a finished run with other data or settings; "
                                    "use another output folder")
            self._load_saved()  # the probe ends as a run leaves it, reused or not
            return FinetuneResult(self.out, settings, reused=True)
        c = self.config
        prev = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
        try:
            if c.threads:
                torch.set_num_threads(c.threads)
            if c.deterministic:
                torch.use_deterministic_algorithms(True)
            self.prepare()
            start, losses = self.load_checkpoint()
            t0 = time.time()
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, initial=start, desc="finetune",
                       disable=_quiet(self.progress, self.total_steps))
            try:
                for step in range(start, self.total_steps):
                    losses.append(self.optimizer_step(step))
                    bar.update(1)
                    bar.set_postfix(loss=f"{losses[-1]:.4f}")
                    if c.save_every and (step + 1) % c.save_every == 0 and step + 1 < self.total_steps:
                        self.save_checkpoint(step + 1, losses)
            finally:
                bar.close()
            self.model.eval()
            settings = dict(self.settings, key=self.key, losses=losses, seconds=round(time.time() - t0, 2),
                            resumed_at=start, torch=torch.__version__)
            self._save(settings)
        finally:
            torch.set_num_threads(prev[0])
            torch.use_deterministic_algorithms(prev[1])
        return FinetuneResult(self.out, settings)

    def _load_saved(self) -> None:
        """A finished run's weights into the probe's model: its adapters attached (or every
        weight replaced), as training would have left them."""
        from safetensors.torch import load_file

        self.prepare()
        name = ADAPTER_DIR if self.config.lora else MODEL_DIR
        saved = load_file(str(self.out / name / ("adapter_model.safetensors" if self.config.lora
                                                 else "model.safetensors")))
        with torch.no_grad():
            if self.config.lora:
                for n, p in self.model.named_parameters():
                    if "lora_" in n:
                        p.copy_(saved[_adapter_key(n)])
            else:
                for k, v in self.model.state_dict().items():
                    if _clean(k) in saved:  # a tied lm_head is saved once, as the embedding
                        v.copy_(saved[_clean(k)])
        self.model.eval()

    def _save(self, settings: dict[str, Any]) -> None:
        """Write the adapter (or model), then finetune.json last: its presence means done."""
        self.out.mkdir(parents=True, exist_ok=True)
        name = ADAPTER_DIR if self.config.lora else MODEL_DIR
        # A folder of its own (not a fixed name): two processes finishing one run never
        # write into each other's files.
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=self.out))
        try:
            if self.config.lora:
                save_adapter(self.model, tmp, self.config, self.base, self.targets, settings)
            else:
                save_full(self.model, self.probe, tmp)
            os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700; give the folder the usual mode
            shutil.rmtree(self.out / name, ignore_errors=True)
            os.replace(tmp, self.out / name)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        write_json(self.out / SETTINGS_FILE, settings)
        (self.out / CHECKPOINT_FILE).unlink(missing_ok=True)


def _clean_named(named: Iterable[tuple[str, Any]]) -> Iterable[tuple[str, Any]]:
    for n, m in named:
        yield _clean(n), m


def _adapter_key(name: str) -> str:
    """A LoRA parameter's name in peft's saved format, from its name on the bridge's model."""
    return "base_model.model." + _clean(name).replace(".default.", ".")


def save_adapter(model: Any, out: Path, config: FinetuneConfig, base: str, targets: Sequence[str],
                 settings: Mapping[str, Any]) -> None:
    """The adapters in peft's format, named as on the plain HF model."""
    from safetensors.torch import save_file

    tensors = {}
    for n, p in model.named_parameters():
        if "lora_" in n:
            tensors[_adapter_key(n)] = p.detach().cpu().contiguous()
    out.mkdir(parents=True, exist_ok=True)
    plain_lora_config(config, base, targets).save_pretrained(str(out))
    save_file(tensors, str(out / "adapter_model.safetensors"))
    write_json(out / "persona_lens.json", {k: v for k, v in settings.items() if k != "losses"})


def save_full(model: Any, probe: "PersonaProbe", out: Path) -> None:
    """The whole finetuned model as an HF checkpoint (config, safetensors, tokenizer)."""
    import copy

    from safetensors.torch import save_file

    cfg = copy.deepcopy(model.config)
    cfg.output_attentions = False  # the bridge asks for attention weights; a checkpoint should not
    out.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(str(out))
    state = {_clean(k): v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    if getattr(cfg, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    probe.tokenizer.save_pretrained(str(out))


def finetune(
    probe: "PersonaProbe",
    data: Any,
    out_dir: str | os.PathLike,
    *,
    vector: PersonaVector | str | os.PathLike | None = None,
    steer: Mapping[int, float] | Sequence[int] | None = None,
    coef: float | None = None,
    positions: str = "all",
    caft: Sequence[int] | None = None,
    config: FinetuneConfig | None = None,
    progress: bool | None = None,
    **settings: Any,
) -> FinetuneResult:
    """Finetune the probe's model on chat data, with preventative steering or CAFT if asked.

    The probe's model is changed in place (LoRA adapters attached, or every weight trained;
    when the folder holds the finished run, its saved weights are loaded into the probe);
    the interventions act only on the training forwards and are gone afterwards.

    Args:
        probe: the model to train.
        data: a JSONL path, a list of conversations, or an HF ``datasets.Dataset``.
        out_dir: where checkpoints, ``adapter/`` (or ``model/``) and ``finetune.json`` go.
            Rerunning the same call resumes from the last checkpoint, or returns the finished
            run.
        vector: the persona vector (a :class:`PersonaVector` or a ``.safetensors`` file).
        steer: preventative steering, ``{layer: coef}`` or a list of layers sharing ``coef``.
        positions: ``"all"`` (the release), ``"response"`` or ``"response_only"`` for the
            steering (see :meth:`PersonaProbe.steer`).
        caft: layers at which to project the vector's direction out (CAFT).
        config: a :class:`FinetuneConfig`; ``**settings`` override its fields (``lr=1e-3``).

    Example (on the organism, 4 optimizer steps of LoRA with preventative steering; the
    command line is ``persona-lens finetune``):
        >>> from persona_lens.organism.datasets import trait_dataset
        >>> data = trait_dataset(world, "evil", "II", n=32, seed=0)
        >>> model = pl.PersonaProbe(pl.load_model("persona-organism"))   # it will be changed
        >>> run = finetune(model, data, "runs/evil_II", vector=vec, steer={2: 1.0},
        ...                r=8, alpha=16, lr=1e-3, batch_size=8, grad_accum=1, warmup_steps=0)
        >>> len(run.losses), sorted(p.name for p in run.path.iterdir())
        (4, ['adapter_config.json', 'adapter_model.safetensors', 'persona_lens.json'])
        >>> run.settings["interventions"]["steer"], model._handles
        ([[2, 1.0]], [])
        >>> tuned = pl.PersonaProbe(pl.load_model("runs/evil_II"))   # base + adapter, unmerged
    """
    unknown = sorted(set(settings) - {f.name for f in fields(FinetuneConfig)})
    if unknown:
        raise FinetuneError(str(V.InvalidArgument.unknown(unknown[0], settings[unknown[0]],
                                                          [f.name for f in fields(FinetuneConfig)], "setting")))
    if config is not None and not isinstance(config, FinetuneConfig):
        raise FinetuneError(str(V.InvalidArgumentType("config", config, "a FinetuneConfig (or None)")))
    config = replace(config or FinetuneConfig(), **settings) if settings else (config or FinetuneConfig())
    iv = Interventions(vector, steer=steer, coef=coef, positions=positions, caft=caft)
    return FinetuneRun(probe, data, out_dir, config, iv, progress).run()


# ----------------------------------------------------------------------------- shift


class LastPromptActivations(dict):
    """``{layer: [n_questions, d_model]}``, and the ``questions`` they were taken on (so that
    a shift never pairs one set of questions' activations with another's)."""

    def __init__(self, acts: Mapping[int, torch.Tensor], questions: Sequence[str]):
        super().__init__(acts)
        self.questions = list(questions)


def last_prompt_activations(probe: "PersonaProbe", questions: Sequence[str], layers: Sequence[int],
                            batch_size: int = 32) -> LastPromptActivations:
    """``{layer: [n_questions, d_model]}`` last-prompt-token activations, no system prompt."""
    convs = [[{"role": "user", "content": q}, {"role": "assistant", "content": ""}] for q in questions]
    acts = probe.capture(convs, layers=list(layers), reductions=["last_prompt"], batch_size=batch_size,
                         progress=False)
    return LastPromptActivations({l: acts.at("last_prompt", l).float() for l in layers}, questions)


def _check_given(name: str, acts: Mapping[int, torch.Tensor], questions: list[str], layers: list[int],
                 d_model: int) -> None:
    """Activations given for one side of a shift must be these questions' at every layer."""
    if getattr(acts, "questions", questions) != questions:
        raise V.InvalidArgument(name, "activations", "", message=(
            f"{name}: these activations were taken on other questions than the ones given; take them with "
            f"last_prompt_activations({name}_probe, questions, layers) on the same questions"))
    missing = [l for l in layers if l not in acts]
    if missing:
        raise V.InvalidArgument(name, sorted(acts), "", message=(
            f"{name}: no activations at layer {missing[0]} (they hold layers {sorted(acts)}); take them at "
            "every layer of the shift"))
    wrong = [l for l in layers if tuple(acts[l].shape) != (len(questions), d_model)]
    if wrong:
        raise V.InvalidArgument(name, "activations", "", message=(
            f"{name}: activations at layer {wrong[0]} have shape {tuple(acts[wrong[0]].shape)}, not "
            f"[{len(questions)} questions, {d_model}]"))


def finetuning_shift(
    base: "PersonaProbe | Mapping[int, torch.Tensor]",
    tuned: "PersonaProbe | Mapping[int, torch.Tensor]",
    vector: PersonaVector,
    questions: Sequence[str],
    layers: Sequence[int] | None = None,
    *,
    batch_size: int = 32,
) -> dict[int, float]:
    """The finetuning shift per layer: mean over ``questions`` of ``(a_tuned - a_base) . u_L``.

    ``a`` is the activation at the last prompt token of the question asked with no system
    prompt; ``u_L`` the unit vector of ``vector`` at layer ``L``. ``base`` and ``tuned`` may
    each be a model's probe or its :func:`last_prompt_activations`, so that one forward per
    model serves many runs and many vectors (with activations on both sides, give ``layers``).

    Example:
        >>> shift = finetuning_shift(probe, probe, vec, prompts, layers=[2, 3])
        >>> shift           # the same model on both sides: no shift
        {2: 0.0, 3: 0.0}
        >>> acts = last_prompt_activations(probe, prompts, [2, 3])
        >>> finetuning_shift(acts, acts, vec, prompts, layers=[2, 3])   # one forward, any number of vectors
        {2: 0.0, 3: 0.0}
    """
    if not isinstance(vector, PersonaVector):
        raise V.InvalidArgumentType("vector", vector, "a PersonaVector")
    questions = [V.text(f"questions[{i}]", q) for i, q in
                 enumerate(V.items("questions", questions, what="a list of question strings", nonempty=True))]
    probe = next((side for side in (tuned, base) if not isinstance(side, Mapping)), None)
    if probe is not None:
        layers = probe._layers(layers)
        vector.check_compatible(probe.n_layers, probe.d_model, None)
        d_model = probe.d_model
    else:
        if layers is None:
            raise V.InvalidArgument("layers", None, "", message=(
                "layers: with activations on both sides, say which layers to shift (the layers they were "
                "taken at), e.g. layers=[3]"))
        layers = check_layers(layers, vector.n_layers, "this vector")
        d_model = vector.d_model
    for name, side in (("base", base), ("tuned", tuned)):  # before any forward runs for the other side
        if isinstance(side, Mapping):
            _check_given(name, side, questions, layers, d_model)
    a_base, a_tuned = (side if isinstance(side, Mapping) else
                       last_prompt_activations(side, questions, layers, batch_size) for side in (base, tuned))
    out = {}
    for l in layers:
        u = vector.unit(l).float()
        out[l] = float(((a_tuned[l].float() - a_base[l].float()) @ u).mean())
    return out
