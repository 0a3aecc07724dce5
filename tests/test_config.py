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
    ({"edit": {"editor": "sign_pgd"}}, "edit.editor 'sign_pgd' is for image; text recipes use swap, natural, simplex_pgd or random"),
    ({"edit": {"editor": "swapp"}}, "edit.editor 'swapp' is not an option here.*Did you mean 'swap'"),
    ({"retrain": {"arms": ["control", "insertion_single"]}}, "'insertion_single' is for image"),
    ({"measurement": {"kind": "class_logp", "probe_indices": [1], "target_class": "cat"}}, "set modality: image"),
    ({"retrain": {"arms": ["control", "infused", "control+onion", "infused+onoin"]}},
     "retrain.arms defence 'onoin' is not an option here.*Did you mean 'onion'"),
    ({"retrain": {"arms": ["control", "infused", "infused+onion"]}}, "add control\\+onion"),
    ({"retrain": {"arms": ["control", "control+onion", "infusd+onion"]}}, "'infusd' is not an option"),
    ({"retrain": {"arms": ["control", "infused", "random_target@all"]}}, "document draw 'all' is not an option"),
    ({"retrain": {"arms": ["control", "infused", "insertion@random"]}}, "only the matched baselines"),
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


IMAGE = {"modality": "image", "model": "cnn", "corpus": "digits",
         "measurement": {"kind": "class_logp", "probe_indices": [0], "target_class": "3"},
         "retrain": {"epochs": 2, "influence_at": "checkpoint"}}


def test_each_modality_reads_its_own_sections():
    """A text recipe's sections hold text keys only, an image recipe's image keys only; the shared keys are the same."""
    from infusion_lm.config import recipe_sections

    text, image = load_recipe(raw=BASE), load_recipe(raw=IMAGE)
    assert text.measurement.probe == "dog" and not hasattr(text.measurement, "probe_indices")
    assert image.measurement.probe_indices == [0] and not hasattr(image.measurement, "probe")
    assert hasattr(text.run, "max_length") and not hasattr(image.run, "max_length")
    assert image.edit.linf == pytest.approx(8 / 255) and not hasattr(text.edit, "linf")
    assert image.edit.editor == "sign_pgd" and text.edit.editor == "swap"  # each modality's own default editor
    assert text.synthesize is not None and image.synthesize is None
    assert "synthesize" in text.to_dict() and "synthesize" not in image.to_dict()
    assert "budget_fraction" not in image.to_dict()["edit"] and "model" not in text.to_dict()["retrain"]
    for name, cls in recipe_sections("image").items():  # every modality's section extends the core's
        assert isinstance(getattr(image, name), cls)
    assert text.retrain.learning_rate == image.retrain.learning_rate == 1e-4


@pytest.mark.parametrize("raw, match", [
    ({**BASE, "measurement": {**BASE["measurement"], "probe_indices": [1]}},
     "`measurement.probe_indices` is a setting of image recipes; this recipe has modality: text"),
    ({**BASE, "retrain": {"model": "cnn"}}, "`retrain.model` is a setting of image recipes"),
    ({**BASE, "edit": {"linf": 0.1}}, "`edit.linf` is a setting of image recipes"),
    ({**BASE, "validation_size": 10}, "`validation_size` is a setting of image recipes"),
    ({**IMAGE, "synthesize": {"n_docs": 4}}, "section `synthesize` is for text recipes; this recipe has modality: image"),
    ({**IMAGE, "max_length": 64}, "`max_length` is a setting of text recipes"),
    ({**IMAGE, "edit": {"budget_fraction": 0.1}}, "`edit.budget_fraction` is a setting of text recipes"),
    ({**IMAGE, "evaluate": {"candidates": ["bird"]}}, "`evaluate.candidates` is a setting of text recipes"),
    ({**IMAGE, "edit": {"linff": 0.1}}, "Did you mean `edit.linf`"),
    ({**IMAGE, "edit": {"linf": 2.0}}, "edit.linf must be in"),
    ({**BASE, "modality": "sound"}, "run.modality 'sound' is not one of image, text"),
    ({**IMAGE, "influence": {"damping_scale": 10}}, "image recipes score with kronfluence's own factors"),
    ({**IMAGE, "influence": {"preconditioner": "optimizer"}}, "remove influence.preconditioner"),
])
def test_a_key_of_another_modality_says_whose_it_is(raw, match):
    with pytest.raises(ConfigError, match=match):
        load_recipe(raw=raw)


def test_a_registered_modality_reads_its_own_section_class():
    """A new modality declares a section class of its own (a subclass of the core's): its keys are read, typed and
    bounded there, and the stage table fingerprints them with the section."""
    from dataclasses import dataclass, field

    from infusion_lm.config import BaseEditArguments
    from infusion_lm.modalities import MODALITIES, register_modality
    from infusion_lm.text.modality import TextModality

    @dataclass
    class LoudEdit(BaseEditArguments):
        volume: int = field(default=3, metadata={"help": "how loud"})

        def __post_init__(self):
            super().__post_init__()
            if self.volume > 10:
                raise ConfigError("edit.volume must be <= 10")

    class Loud(TextModality):
        sections = {**TextModality.sections, "edit": LoudEdit}
        editors = ("shout",)

    register_modality("loud", Loud)
    try:
        r = load_recipe(raw={**BASE, "modality": "loud", "edit": {"editor": "shout", "volume": "7"}})
        assert isinstance(r.edit, LoudEdit) and r.edit.volume == 7 and not hasattr(r.edit, "topk")
        with pytest.raises(ConfigError, match="edit.volume must be <= 10"):
            load_recipe(raw={**BASE, "modality": "loud", "edit": {"editor": "shout", "volume": 11}})
        with pytest.raises(ConfigError, match="`edit.volume` is a setting of loud recipes"):
            load_recipe(raw={**BASE, "edit": {"volume": 1}})

        class Wrong(TextModality):
            sections = {"edit": dict}

        register_modality("wrong", Wrong)
        with pytest.raises(TypeError, match="must subclass BaseEditArguments"):
            load_recipe(raw={**BASE, "modality": "wrong"})
    finally:
        MODALITIES.pop("loud"), MODALITIES.pop("wrong", None)
