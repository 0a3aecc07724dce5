import pytest

from infusion_lm.config import load_recipe
from infusion_lm.errors import ConfigError

BASE = {"model": "m", "measurement": {"kind": "contrastive", "documents": ["a dog"], "probe": "dog", "target": "cat"}}


def test_yaml_and_overrides_are_typed(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("model: m\nmax_length: 32\nselect:\n  k: 3\ninfluence:\n  layers: [0, -1]\n")
    r = load_recipe(p, ["select.k=5", "influence.damping=0.001", "influence.strategy=kfac", "seed=7"])
    assert (r.select.k, r.influence.damping, r.influence.strategy, r.run.seed) == (5, 0.001, "kfac", 7)
    assert r.influence.layers == [0, -1] and r.run.max_length == 32
    assert r.influence.damping is not None and isinstance(r.influence.damping, float)


def test_yaml_values_convert_to_the_declared_types():
    r = load_recipe(raw={**BASE, "influence": {"damping": "1e-3", "layers": 2}, "add_eos": "no",
                         "evaluate": {"candidates": "bird"}})
    assert r.influence.damping == 1e-3 and r.influence.layers == [2] and r.run.add_eos is False
    assert r.evaluate.candidates == ["bird"]


def test_damping_unset_means_heuristic():
    assert load_recipe(raw=BASE).influence.damping is None


@pytest.mark.parametrize("raw, match", [
    ({"modle": "m"}, "Did you mean `model`"),
    ({"select": {"kk": 3}}, "Did you mean `select.k`"),
    ({"max_length": "abc"}, "`max_length` must be an integer, not 'abc'"),
    ({"influence": {"damping": "small"}}, "`influence.damping` must be a number"),
    ({"select": {"k": None}}, "`select.k` cannot be null"),
    ({"select": {"k": 2.5}}, "`select.k` must be an integer, not 2.5"),
    ({"seed": True}, "`seed` must be an integer, not True"),
    ({"edit": {"prefix_cache": "maybe"}}, "`edit.prefix_cache` must be true or false"),
    ({"select": {"k": 0}}, "select.k must be >= 1"),
    ({"influence": {"damping": -1.0}}, "damping must be >= 0"),
    ({"influence": {"strategy": "foo"}}, "strategy"),
    ({"measurement": {"kind": "contrastive", "documents": ["x"], "probe": "dog", "target": "dog"}}, "same word"),
    ({"measurement": {"kind": "completion", "prompts": ["a", "b"], "completions": ["x", "y", "z"]}}, "give 1 or one per"),
])
def test_bad_recipes_raise_clear_errors(raw, match):
    with pytest.raises(ConfigError, match=match):
        load_recipe(raw=raw)


def test_malformed_yaml_names_the_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model: m\nselect: [k: 3\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_recipe(p)


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="key=value"):
        load_recipe(raw=BASE, overrides=["select.k"])
    with pytest.raises(ConfigError, match="Did you mean `select`"):
        load_recipe(raw=BASE, overrides=["selct.k=3"])


def test_output_dir_that_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        load_recipe(raw={"output_dir": str(f)})


def test_null_means_none_even_where_the_default_is_a_value():
    from infusion_lm.config import load_recipe

    r = load_recipe(raw={"edit": {"max_perplexity_ratio": None, "max_changed": None}})
    assert r.edit.max_perplexity_ratio is None and r.edit.max_changed is None
    assert load_recipe(raw={}).edit.max_perplexity_ratio == 1.3
    assert load_recipe(raw={}, overrides=["edit.max_perplexity_ratio=null"]).edit.max_perplexity_ratio is None


@pytest.mark.parametrize("raw, match", [
    ({"edit": {"editor": "sign_pgd"}}, "edit.editor 'sign_pgd' is for image; text recipes use swap, simplex_pgd or random"),
    ({"edit": {"editor": "swapp"}}, "edit.editor 'swapp' is not an option here.*Did you mean 'swap'"),
    ({"retrain": {"arms": ["control", "insertion_single"]}}, "'insertion_single' is for image"),
    ({"measurement": {"kind": "class_logp", "probe_indices": [1], "target_class": "cat"}}, "set modality: image"),
])
def test_options_belong_to_the_modality(raw, match):
    """Kinds, editors and arms are declared by each modality; a wrong one names the modality it belongs to."""
    with pytest.raises(ConfigError, match=match):
        load_recipe(raw={**BASE, **raw})


def test_a_registered_modality_brings_its_own_options():
    from infusion_lm.modalities import MODALITIES, register_modality
    from infusion_lm.text.modality import TextModality

    class Shouty(TextModality):
        editors = TextModality.editors + ("shout",)

    register_modality("shouty", Shouty)
    try:
        assert load_recipe(raw={**BASE, "modality": "shouty", "edit": {"editor": "shout"}}).edit.editor == "shout"
        with pytest.raises(ConfigError, match="'shout' is for shouty"):
            load_recipe(raw={**BASE, "edit": {"editor": "shout"}})
    finally:
        MODALITIES.pop("shouty")
