"""``PersonaVector``: one trait direction per layer, behaving like a value.

Layer convention (docs/method.md, "Layers"): row ``L`` is the residual stream *entering*
block ``L`` (TransformerLens ``blocks.L.hook_resid_pre``, HF ``output_hidden_states[L]``);
row ``n_layers`` is the output of the last block *before* the final norm. Row 0 is the
embeddings.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from persona_lens import validate as V

_FORMAT = "persona_lens.PersonaVector/1"
_POSITIONS = ("response_mean", "prompt_mean", "last_prompt")


def check_layer(layer: Any, n_layers: int, owner: str, hint: str = "", name: str = "layer") -> int:
    """Return ``layer`` as an int if it is one in ``0..n_layers``, else raise naming ``owner``."""
    layer = V.integer(name, layer)
    if not 0 <= layer <= n_layers:
        where = "" if name == "layer" else f"{name} = {layer}: "
        raise V.InvalidArgument(name, layer, f"in 0..{n_layers}", message=(
            f"{where}layer {layer} is out of range: {owner} has layers 0..{n_layers}{hint}"))
    return layer


def check_layers(layers: Any, n_layers: int, owner: str, hint: str = "", name: str = "layers") -> list[int]:
    """``layers`` (one layer or a list of them) as sorted distinct ints in ``0..n_layers``, else
    raise naming ``owner`` and the offending entry.

    Example:
        >>> check_layers([3, 1, 3], 6, "this vector")
        [1, 3]
    """
    if V.is_integer(layers):
        layers = [layers]
    given = V.items(name, layers, what="a layer or a list of layers", nonempty=True)
    return sorted({check_layer(l, n_layers, owner, hint, name=f"{name}[{i}]") for i, l in enumerate(given)})


class VectorMismatchError(ValueError):
    """A vector does not fit the model it is used with (layer count or d_model)."""


class PostNormRowWarning(UserWarning):
    """A released vector's last row is used: the release took it after the model's final
    norm, while layer ``n_layers`` here is the stream before it, so the row's scale and
    direction do not match the activations it is applied to."""


class VectorFileError(ValueError):
    """A file is not a readable persona vector (not ours, corrupt, or holding no vector);
    the message names the file."""


@dataclass
class PersonaVector:
    """Per-layer persona directions ``[n_layers + 1, d_model]`` with their provenance.

    Vectors are values: ``a + b``, ``a - b``, ``2.0 * a``, ``-a`` give new vectors and keep
    ``a``'s metadata. Directions are stored in float32 on the CPU and moved to the model's
    device and dtype when used.

    Args:
        directions: ``[n_layers + 1, d_model]``; row ``L`` is the residual stream entering
            block ``L``.
        model_name: the model the vector was extracted from.
        trait: the trait's name.
        position: the reduction the means were taken over (``"response_mean"``,
            ``"prompt_mean"``, ``"last_prompt"``).
        n_pos: number of positive samples behind the mean.
        n_neg: number of negative samples behind the mean.
        notes: free-form metadata (judge, thresholds, ...); must be JSON-serialisable.

    Example:
        >>> import torch, persona_lens as pl
        >>> v = pl.PersonaVector(torch.randn(4, 8), model_name="tiny", trait="evil")
        >>> w = 2.0 * v - v
        >>> torch.allclose(w.directions, v.directions)
        True
        >>> round(float(v.unit(2).norm()), 6)
        1.0
        >>> v
        PersonaVector(trait='evil', model_name='tiny', layers=0..3, d_model=8, position='response_mean', n_pos=None, n_neg=None)
    """

    # [n_layers + 1, d_model]. Annotated as any tensor on purpose: __post_init__ checks the
    # shape itself, always and with a clearer error than a type checker's, and converts.
    directions: Tensor
    model_name: str | None = None
    trait: str | None = None
    position: str = "response_mean"
    n_pos: int | None = None
    n_neg: int | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        d = self.directions
        if not isinstance(d, Tensor):
            if isinstance(d, (str, bytes)) or not hasattr(d, "__len__") and not hasattr(d, "__array__"):
                raise V.InvalidArgumentType("directions", d, "a [n_layers + 1, d_model] tensor")
            try:
                d = torch.as_tensor(d)
            except (TypeError, ValueError, RuntimeError) as e:
                raise V.InvalidArgumentType("directions", self.directions,
                                            f"a [n_layers + 1, d_model] tensor ({e})") from None
        if d.dtype == torch.bool or d.is_complex():
            raise V.InvalidArgumentType("directions", d, "a tensor of real numbers")
        if d.ndim != 2:
            raise ValueError(
                f"directions must have shape [n_layers + 1, d_model], got {tuple(d.shape)}"
            )
        if not torch.isfinite(d).all():
            raise ValueError("directions contain NaN or inf")
        if d.shape[0] < 2 or d.shape[1] < 1:
            raise ValueError(
                f"directions must have shape [n_layers + 1, d_model] with at least one layer "
                f"(two rows) and d_model >= 1, got {tuple(d.shape)}"
            )
        self.directions = d.detach().to(device="cpu", dtype=torch.float32).contiguous()
        V.text("model_name", self.model_name, none_ok=True)
        V.text("trait", self.trait, none_ok=True)
        V.choice("position", self.position, _POSITIONS)
        self.n_pos = V.integer("n_pos", self.n_pos, min=0, none_ok=True)
        self.n_neg = V.integer("n_neg", self.n_neg, min=0, none_ok=True)
        self.notes = dict(V.mapping("notes", self.notes))
        try:
            json.dumps(self.notes, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise V.InvalidArgument("notes", self.notes, "JSON-serialisable (plain numbers, strings, "
                                    f"lists and dicts; no NaN)", f" ({e})") from None

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_means(
        cls,
        pos_mean: Float[Tensor, "n_layers_plus_1 d_model"],
        # Same shape as pos_mean; "_" leaves the check to the body, whose error says more.
        neg_mean: Float[Tensor, "_n_layers_plus_1 _d_model"],
        **metadata: Any,
    ) -> "PersonaVector":
        """Mean difference ``pos_mean - neg_mean``, per layer (the paper's vector).

        Example:
            >>> v = PersonaVector.from_means(torch.ones(3, 4), torch.zeros(3, 4), trait="evil")
            >>> v.directions[0].tolist()
            [1.0, 1.0, 1.0, 1.0]
        """
        if pos_mean.shape != neg_mean.shape:
            raise ValueError(
                f"positive and negative means differ in shape: {tuple(pos_mean.shape)} vs "
                f"{tuple(neg_mean.shape)}"
            )
        return cls(pos_mean.float() - neg_mean.float(), **metadata)

    # -- shape ----------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        """Number of transformer blocks of the model the vector belongs to."""
        return self.directions.shape[0] - 1

    @property
    def d_model(self) -> int:
        return self.directions.shape[1]

    def _check_layer(self, layer: int) -> int:
        return check_layer(layer, self.n_layers, "this vector")

    def __getitem__(self, layer: int) -> Float[Tensor, " d_model"]:
        """The direction at ``layer``; warns (:class:`PostNormRowWarning`) for the last row of
        a released file (:meth:`from_released_pt`), which was taken after the final norm.

        Example:
            >>> torch.save(torch.randn(7, 8), "released.pt")
            >>> v = PersonaVector.from_released_pt("released.pt")
            >>> row = v[5]                       # rows 0..n_layers-1 carry over unchanged
            >>> import warnings
            >>> with warnings.catch_warnings(record=True) as caught:
            ...     warnings.simplefilter("always")
            ...     row = v[6]
            >>> caught[0].category.__name__
            'PostNormRowWarning'
        """
        layer = self._check_layer(layer)
        if layer == self.n_layers and self.notes.get("last_row_post_norm"):
            warnings.warn(
                f"row {layer} of this vector ({self.notes.get('source', 'a released file')}) was taken after "
                f"the model's final norm, but layer {layer} here is the last block's output before it: the "
                f"direction does not match the stream it is used on; use a layer below {layer}",
                PostNormRowWarning, stacklevel=2)
        return self.directions[layer]

    def unit(self, layer: int) -> Float[Tensor, " d_model"]:
        """The direction at ``layer`` scaled to unit norm (error if it is zero)."""
        v = self[layer]
        n = v.norm()
        if n == 0:
            raise ValueError(f"the direction at layer {layer} is zero and has no unit vector")
        return v / n

    def norms(self) -> Float[Tensor, " n_layers_plus_1"]:
        """L2 norm of the direction at every layer."""
        return self.directions.norm(dim=-1)

    def cosine(
        self, other: "PersonaVector", layer: int | None = None
    ) -> Float[Tensor, " n_layers_plus_1"] | float:
        """Cosine similarity with another vector: per layer, or at one ``layer``.

        Example:
            >>> a = PersonaVector(torch.eye(3)); b = PersonaVector(torch.eye(3) + torch.eye(3).flip(0))
            >>> round(a.cosine(b, layer=0), 3)
            0.707
        """
        self._check_same_shape(other)
        cos = torch.nn.functional.cosine_similarity(self.directions, other.directions, dim=-1)
        return cos if layer is None else float(cos[self._check_layer(layer)])

    def without(self, *others: "PersonaVector") -> "PersonaVector":
        """The part of this vector that the ``others`` do not share: at every layer, the
        component orthogonal to the span of the others' directions at that layer.

        Persona vectors of different traits share directions (each is measured against the
        same helpful answers), so a dataset that teaches one trait also moves its projection on
        the others. Projected on ``evil.without(sycophantic, hallucinating)``, a shift or a
        projection difference counts only what the other traits' vectors cannot account for.
        The result keeps this vector's metadata and records the others' traits in
        ``notes["without"]``; a layer where this direction lies in the others' span comes out
        exactly zero (its :meth:`unit` then raises). Not normalised: steer with it knowing its
        norm is smaller.

        Example:
            >>> a = PersonaVector(torch.tensor([[1., 1.], [2., 0.]]), trait="evil")
            >>> b = PersonaVector(torch.tensor([[1., 0.], [0., 3.]]), trait="sycophantic")
            >>> s = a.without(b)
            >>> s.directions.tolist(), s.notes["without"]
            ([[0.0, 1.0], [2.0, 0.0]], ['sycophantic'])
            >>> round(s.cosine(b, layer=0), 6)
            0.0
        """
        if not others:
            raise ValueError("without() needs at least one other vector to project out, e.g. "
                             "evil.without(sycophantic, hallucinating)")
        for o in others:
            self._check_same_shape(o)
            if self.model_name and o.model_name and o.model_name != self.model_name:
                warnings.warn(f"projecting a vector of {o.model_name!r} out of one of {self.model_name!r}",
                              stacklevel=2)
        v = self.directions.double()                                          # [L, d]
        basis = torch.stack([o.directions.double() for o in others], dim=1)  # [L, k, d]
        # The projection onto the others' row space through the pseudo-inverse: exact for
        # collinear others and for layers where some of them are zero (a vector extracted
        # without that layer). A residual under 1e-6 of the norm is float32 rounding of a
        # direction inside the span (stored directions carry ~1e-7 relative error): zero.
        coef = torch.einsum("ld,ldk->lk", v, torch.linalg.pinv(basis))
        rest = v - torch.einsum("lk,lkd->ld", coef, basis)
        inside = rest.norm(dim=-1) <= 1e-6 * v.norm(dim=-1)
        rest[inside] = 0.0
        out = self._with(rest.float())
        out.notes["without"] = list(self.notes.get("without", [])) + [o.trait or "?" for o in others]
        return out

    # -- arithmetic -----------------------------------------------------------------------
    def _check_same_shape(self, other: "PersonaVector") -> None:
        if not isinstance(other, PersonaVector):
            raise TypeError(f"expected a PersonaVector, got {type(other).__name__}")
        if other.directions.shape != self.directions.shape:
            raise VectorMismatchError(
                f"vectors differ in shape: {tuple(self.directions.shape)} "
                f"({self.model_name}) vs {tuple(other.directions.shape)} ({other.model_name})"
            )

    def _with(self, directions: Tensor) -> "PersonaVector":
        return replace(self, directions=directions, notes=dict(self.notes))

    def __add__(self, other: "PersonaVector") -> "PersonaVector":
        self._check_same_shape(other)
        return self._with(self.directions + other.directions)

    def __sub__(self, other: "PersonaVector") -> "PersonaVector":
        self._check_same_shape(other)
        return self._with(self.directions - other.directions)

    def __mul__(self, scalar: object) -> "PersonaVector":  # NotImplemented for non-scalars
        if not isinstance(scalar, (int, float)) or isinstance(scalar, bool):
            return NotImplemented
        scalar = V.number("scalar", scalar)
        out = self.directions * scalar
        if not torch.isfinite(out).all():
            raise V.InvalidArgument("scalar", scalar, "small enough that the directions stay finite in float32")
        return self._with(out)

    __rmul__ = __mul__

    def __truediv__(self, scalar: float) -> "PersonaVector":
        if not isinstance(scalar, (int, float)) or isinstance(scalar, bool):
            return NotImplemented
        if V.number("divisor", scalar) == 0:
            raise V.InvalidArgument("divisor", scalar, "a finite non-zero number")
        return self * (1.0 / scalar)

    def __neg__(self) -> "PersonaVector":
        return self * -1.0

    def __repr__(self) -> str:
        return (
            f"PersonaVector(trait={self.trait!r}, model_name={self.model_name!r}, "
            f"layers=0..{self.n_layers}, d_model={self.d_model}, position={self.position!r}, "
            f"n_pos={self.n_pos}, n_neg={self.n_neg})"
        )

    # -- compatibility --------------------------------------------------------------------
    def check_compatible(self, n_layers: int, d_model: int, model_name: str | None = None) -> None:
        """Raise ``VectorMismatchError`` unless the vector fits a model of this shape.

        A different ``model_name`` with the same shape only warns: the paper applies a base
        model's vectors to its finetuned variants, which carry other names.
        """
        if self.d_model != d_model or self.n_layers != n_layers:
            raise VectorMismatchError(
                f"vector from {self.model_name or 'an unnamed model'} has {self.n_layers} layers "
                f"and d_model {self.d_model}, but the model {model_name or ''} has {n_layers} "
                f"layers and d_model {d_model}: it was extracted from another model"
            )
        if self.model_name and model_name and self.model_name != model_name:
            warnings.warn(
                f"vector was extracted from {self.model_name!r} and is used on {model_name!r}",
                stacklevel=3,
            )

    # -- I/O ------------------------------------------------------------------------------
    def _metadata(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "trait": self.trait,
            "position": self.position,
            "n_pos": self.n_pos,
            "n_neg": self.n_neg,
            "notes": self.notes,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Save as safetensors, metadata as JSON in the file's header.

        The file is written atomically (a temporary file of its own, then a rename), so a
        reader never sees half a vector, and concurrent saves never fail each other.

        Example:
            >>> v = PersonaVector(torch.randn(3, 4), trait="evil", notes={"judge": "gpt-4.1-mini"})
            >>> path = v.save("vectors/evil.safetensors")
            >>> w = PersonaVector.load(path)
            >>> w.trait, w.notes, torch.equal(w.directions, v.directions)
            ('evil', {'judge': 'gpt-4.1-mini'}, True)
        """
        from safetensors.torch import save

        from persona_lens.pipeline_io import write_bytes

        path = V.path("path", path)
        meta = {"format": _FORMAT, "persona_lens": json.dumps(self._metadata())}
        return write_bytes(path, save({"directions": self.directions}, metadata=meta))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PersonaVector":
        """Load a vector written by :meth:`save`.

        Raises:
            FileNotFoundError: no file at ``path``.
            VectorFileError: the file is not a persona_lens vector (another safetensors
                file, a corrupt or truncated one, metadata that is not ours); the message
                names the file.
        """
        from safetensors.torch import load as load_tensors

        path = V.path("path", path)
        if not path.exists():
            raise FileNotFoundError(f"no vector file at {path}")
        if path.is_dir():
            raise VectorFileError(f"{path} is a folder, not a vector file")
        # One read of the whole file, header and tensors from the same bytes: safetensors'
        # own reader opens the path twice, and a file replaced in between (another process
        # saving the same vector) would pair one file's metadata with the other's tensors.
        data = path.read_bytes()
        try:
            tensors = load_tensors(data)
            n = int.from_bytes(data[:8], "little")
            meta = json.loads(data[8 : 8 + n]).get("__metadata__") or {}
        except Exception as exc:  # safetensors raises several types for corrupt files
            raise VectorFileError(f"{path} is not a persona_lens vector file: {exc}") from exc
        if "directions" not in tensors:
            raise VectorFileError(f"{path} holds no 'directions' tensor (tensors: {sorted(tensors)})")
        directions = tensors["directions"]
        if meta.get("format") != _FORMAT:
            raise VectorFileError(f"{path} is not a persona_lens vector file (format {meta.get('format')!r})")
        try:
            fields = json.loads(meta.get("persona_lens", ""))
        except json.JSONDecodeError as exc:
            raise VectorFileError(f"{path}: the vector's metadata is not JSON ({exc})") from None
        known = {"model_name", "trait", "position", "n_pos", "n_neg", "notes"}
        if not isinstance(fields, dict) or set(fields) - known:
            extra = sorted(set(fields) - known) if isinstance(fields, dict) else type(fields).__name__
            raise VectorFileError(f"{path}: the vector's metadata is not persona_lens metadata "
                                  f"(unexpected: {extra})")
        try:
            return cls(directions, **fields)
        except ValueError as exc:  # InvalidArgument(Type) included
            raise VectorFileError(f"{path}: {exc}") from None

    @classmethod
    def from_released_pt(cls, path: str | os.PathLike, **metadata: Any) -> "PersonaVector":
        """Read a vector file of the paper's release (a ``[n_layers + 1, d_model]`` tensor).

        The release indexes layers like ``output_hidden_states``, which is this project's
        convention, so rows carry over unchanged. One caveat: its last row was taken after
        the model's final norm, ours before it (``notes["last_row_post_norm"]`` says so).

        Example:
            >>> torch.save(torch.randn(29, 3584), "evil_response_avg_diff.pt")  # Qwen2.5-7B's shape
            >>> v = PersonaVector.from_released_pt("evil_response_avg_diff.pt", trait="evil")
            >>> v.n_layers, v.d_model, v.position, v.notes["last_row_post_norm"]
            (28, 3584, 'response_mean', True)
        """
        path = V.path("path", path)
        if not path.is_file():
            raise FileNotFoundError(f"no vector file at {path}")
        try:
            t = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle, zip and torch errors for a file that is not a tensor
            raise VectorFileError(f"{path} is not a released vector file (torch.load failed: "
                                  f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
        if not isinstance(t, Tensor) or t.ndim != 2:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise VectorFileError(f"{path}: expected a [n_layers + 1, d_model] tensor, got {shape}")
        notes = dict(metadata.pop("notes", {}))
        notes.setdefault("source", f"released file {Path(path).name}")
        notes["last_row_post_norm"] = True
        name = Path(path).stem
        position = "response_mean"
        if "prompt_avg" in name:
            position = "prompt_mean"
        elif "prompt_last" in name:
            position = "last_prompt"
        metadata.setdefault("position", position)
        try:
            return cls(t, notes=notes, **metadata)
        except V.InvalidArgument:
            raise  # a bad keyword argument of the caller's
        except ValueError as exc:
            raise VectorFileError(f"{path}: {exc}") from None


def specific_vectors(vectors: "Mapping[str, PersonaVector] | Sequence[PersonaVector]") -> dict[str, PersonaVector]:
    """Every vector without the others (:meth:`PersonaVector.without`): the trait-specific
    vectors of a set of traits, under the same names (a list is named by the vectors' traits).

    Example:
        >>> import torch
        >>> evil = PersonaVector(torch.tensor([[1., 1.], [2., 0.]]), trait="evil")
        >>> syco = PersonaVector(torch.tensor([[1., 0.], [0., 3.]]), trait="sycophantic")
        >>> only = specific_vectors([evil, syco])
        >>> only["evil"].directions.tolist(), only["sycophantic"].notes["without"]
        ([[0.0, 1.0], [2.0, 0.0]], ['evil'])
    """
    if isinstance(vectors, Mapping):
        named = dict(vectors)
    else:
        items = list(vectors)
        names = [getattr(v, "trait", None) for v in items]
        if not all(names) or len(set(names)) != len(names):
            raise ValueError(f"a list of vectors is named by their traits, and these are {names}: pass "
                             "{name: vector} instead")
        named = dict(zip(names, items))
    if len(named) < 2:
        raise ValueError(f"specific vectors need two vectors or more (got {len(named)}): each is projected "
                         "off the others")
    return {n: v.without(*(o for m, o in named.items() if m != n)) for n, v in named.items()}
