"""PersonaVector: arithmetic, unit vectors, cosine, safetensors I/O, released .pt files."""

from __future__ import annotations

import math

import pytest
import torch

from persona_lens import PersonaVector, VectorMismatchError


def vec(seed=0, shape=(4, 6), **meta):
    return PersonaVector(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), **meta)


def test_from_means_is_difference():
    pos, neg = torch.randn(4, 6), torch.randn(4, 6)
    v = PersonaVector.from_means(pos, neg, trait="evil", n_pos=3, n_neg=5)
    torch.testing.assert_close(v.directions, pos - neg)
    assert (v.n_layers, v.d_model, v.n_pos, v.n_neg) == (3, 6, 3, 5)
    with pytest.raises(ValueError, match="differ in shape"):
        PersonaVector.from_means(torch.randn(4, 6), torch.randn(3, 6))


def test_arithmetic_is_elementwise_and_keeps_metadata():
    a, b = vec(1, trait="evil", notes={"k": 1}), vec(2)
    torch.testing.assert_close((a + b).directions, a.directions + b.directions)
    torch.testing.assert_close((a - b).directions, a.directions - b.directions)
    torch.testing.assert_close((2.5 * a).directions, 2.5 * a.directions)
    torch.testing.assert_close((a * 2).directions, 2 * a.directions)
    torch.testing.assert_close((-a).directions, -a.directions)
    torch.testing.assert_close((a / 4).directions, a.directions / 4)
    s = a * 3
    assert s.trait == "evil" and s.notes == {"k": 1}
    s.notes["k"] = 2
    assert a.notes == {"k": 1}, "a derived vector must not share mutable metadata"
    with pytest.raises(VectorMismatchError):
        a + vec(3, shape=(5, 6))
    with pytest.raises(TypeError):
        a * a


def test_unit_and_cosine_against_formula():
    a, b = vec(1), vec(2)
    for layer in range(4):
        u = a.unit(layer)
        assert float(u.norm()) == pytest.approx(1.0, abs=1e-6)
        x, y = a.directions[layer], b.directions[layer]
        expected = float(x @ y) / math.sqrt(float(x @ x) * float(y @ y))
        assert a.cosine(b, layer=layer) == pytest.approx(expected, abs=1e-6)
    assert a.cosine(b).shape == (4,)
    assert a.cosine(a, layer=0) == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(a.norms(), a.directions.norm(dim=-1))
    with pytest.raises(ValueError, match="out of range"):
        a.unit(4)
    with pytest.raises(ValueError, match="zero"):
        PersonaVector(torch.zeros(2, 3)).unit(0)


def test_without_is_the_least_squares_residual_per_layer():
    import numpy as np

    a = vec(1, shape=(5, 16), trait="evil", model_name="m", notes={"k": 1})
    b, c = vec(2, shape=(5, 16), trait="sycophantic"), vec(3, shape=(5, 16), trait="hallucinating")
    s = a.without(b, c)
    for layer in range(5):
        # Independent: numpy's least squares of a's row on the others' rows, per layer.
        basis = np.stack([b.directions[layer].numpy(), c.directions[layer].numpy()], axis=1).astype(np.float64)
        target = a.directions[layer].numpy().astype(np.float64)
        x, *_ = np.linalg.lstsq(basis, target, rcond=None)
        np.testing.assert_allclose(s.directions[layer].numpy(), target - basis @ x, atol=1e-5)
        assert abs(s.cosine(b, layer=layer)) < 1e-5 and abs(s.cosine(c, layer=layer)) < 1e-5
    assert s.directions.dtype == torch.float32
    assert (s.trait, s.model_name, s.notes) == ("evil", "m", {"k": 1, "without": ["sycophantic", "hallucinating"]})
    assert a.notes == {"k": 1}, "the original keeps its metadata"
    torch.testing.assert_close(s.without(b).directions, s.directions, atol=1e-5, rtol=0)  # already orthogonal
    assert s.without(b).notes["without"] == ["sycophantic", "hallucinating", "sycophantic"]


def test_without_handles_collinear_zero_and_inside_directions():
    b = vec(2, shape=(3, 8), trait="b")
    zero_row = b.directions.clone()
    zero_row[1] = 0.0  # a vector extracted without layer 1
    a = vec(1, shape=(3, 8))
    # A duplicated or zero other changes nothing against projecting out b alone.
    torch.testing.assert_close(a.without(b, b).directions, a.without(b).directions, atol=1e-5, rtol=0)
    s = a.without(PersonaVector(zero_row))
    torch.testing.assert_close(s.directions[1], a.directions[1])
    # Inside the span: exactly zero, and the unit vector says so.
    inside = PersonaVector(2.0 * b.directions - 0.5 * zero_row)
    t = inside.without(b)
    assert torch.count_nonzero(t.directions) == 0
    with pytest.raises(ValueError, match="zero"):
        t.unit(0)


def test_specific_vectors_of_a_set_of_traits():
    from persona_lens import specific_vectors

    a, b, c = (vec(i, shape=(3, 8), trait=t) for i, t in enumerate(("evil", "sycophantic", "hallucinating")))
    got = specific_vectors([a, b, c])
    assert list(got) == ["evil", "sycophantic", "hallucinating"]
    torch.testing.assert_close(got["sycophantic"].directions, b.without(a, c).directions)
    assert list(specific_vectors({"x": a, "y": b})) == ["x", "y"]
    with pytest.raises(ValueError, match="two vectors or more"):
        specific_vectors({"x": a})
    with pytest.raises(ValueError, match="named by their traits"):
        specific_vectors([a, vec(4, shape=(3, 8), trait="evil")])


def test_without_rejects_bad_others():
    a = vec(1)
    with pytest.raises(ValueError, match="at least one"):
        a.without()
    with pytest.raises(VectorMismatchError):
        a.without(vec(2, shape=(5, 6)))
    with pytest.raises(TypeError, match="PersonaVector"):
        a.without(torch.randn(4, 6))
    with pytest.warns(UserWarning, match="projecting a vector of 'other'"):
        vec(1, model_name="mine").without(vec(2, model_name="other"))


def test_save_load_roundtrip(tmp_path):
    a = vec(1, model_name="m", trait="evil", position="prompt_mean", n_pos=7, n_neg=9, notes={"judge": "x", "thr": [50, 50]})
    p = a.save(tmp_path / "sub" / "evil.safetensors")
    b = PersonaVector.load(p)
    assert torch.equal(a.directions, b.directions)
    assert (b.model_name, b.trait, b.position, b.n_pos, b.n_neg, b.notes) == ("m", "evil", "prompt_mean", 7, 9, {"judge": "x", "thr": [50, 50]})


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        PersonaVector.load(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a persona_lens vector"):
        PersonaVector.load(bad)
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"directions": torch.zeros(2, 2)}, str(other))
    with pytest.raises(ValueError, match="not a persona_lens vector"):
        PersonaVector.load(other)


def test_from_released_pt(tmp_path):
    t = torch.randn(29, 16)
    p = tmp_path / "evil_prompt_avg_diff.pt"
    torch.save(t, p)
    v = PersonaVector.from_released_pt(p, trait="evil", model_name="Qwen/Qwen2.5-7B-Instruct")
    assert torch.equal(v.directions, t)
    assert (v.n_layers, v.position, v.trait) == (28, "prompt_mean", "evil")
    assert v.notes["last_row_post_norm"] is True
    torch.save({"not": "a tensor"}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="expected a"):
        PersonaVector.from_released_pt(tmp_path / "x.pt")


def test_check_compatible():
    a = vec(1, model_name="m1")
    a.check_compatible(3, 6, "m1")
    with pytest.raises(VectorMismatchError, match="d_model 6"):
        a.check_compatible(3, 8, "m2")
    with pytest.raises(VectorMismatchError, match="another model"):
        a.check_compatible(5, 6, "m2")
    with pytest.warns(UserWarning, match="extracted from 'm1'"):
        a.check_compatible(3, 6, "m1-finetuned")


def test_rejects_bad_directions():
    with pytest.raises(ValueError, match="shape"):
        PersonaVector(torch.zeros(5))
    with pytest.raises(ValueError, match="NaN"):
        PersonaVector(torch.tensor([[float("nan")]]))


def test_a_released_vectors_post_norm_last_row_warns_where_it_is_used(tmp_path, tiny):
    """The release's row n_layers was taken after the final norm; here layer n_layers is the
    stream before it. Steering, ablating or projecting with that row warns; other rows and
    our own vectors do not."""
    import warnings

    from persona_lens import PostNormRowWarning

    probe, _, _ = tiny
    n = probe.n_layers
    path = tmp_path / "evil_response_avg_diff.pt"
    torch.save(torch.randn(n + 1, probe.d_model, generator=torch.Generator().manual_seed(1)), path)
    released = PersonaVector.from_released_pt(path, trait="evil")
    prompts = ["Hi there"]
    with pytest.warns(PostNormRowWarning, match="after the model's final norm"):
        with probe.steer(released, layer=n, coef=1.0):
            probe.generate(prompts, max_new_tokens=2)
    with pytest.warns(PostNormRowWarning):
        probe.project(prompts, released, layer=n)
    with pytest.warns(PostNormRowWarning):
        with probe.ablate(2.0 * released, layers=[n]):  # arithmetic keeps the provenance
            pass
    ours = PersonaVector(released.directions.clone())
    with warnings.catch_warnings():
        warnings.simplefilter("error", PostNormRowWarning)
        with probe.steer(released, layer=n - 1, coef=1.0):
            probe.generate(prompts, max_new_tokens=2)
        probe.project(prompts, ours, layer=n)
