import pytest

from infusion_lm.errors import ConfigError
from infusion_lm.tracked_modules import resolve_tracked_modules
from tiny import tiny_model


def test_default_is_mlp_and_attention_projections_of_chosen_layers():
    model = tiny_model(64, layers=3)
    names = resolve_tracked_modules(model, layers=[-1], module_types=["mlp"])
    assert names == [f"model.layers.2.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    both = resolve_tracked_modules(model, layers=[0])
    assert len(both) == 7 and all(n.startswith("model.layers.0.") for n in both)
    assert not any("lm_head" in n or "embed" in n for n in resolve_tracked_modules(model))


def test_lm_head_and_embeddings_are_never_tracked():
    model = tiny_model(64)
    with pytest.raises(ConfigError, match="never tracked"):
        resolve_tracked_modules(model, patterns=["lm_head"])
    with pytest.raises(ConfigError, match="matches no"):
        resolve_tracked_modules(model, patterns=["model.layers.9.*"])
    with pytest.raises(ConfigError, match="has 5"):
        resolve_tracked_modules(model, layers=[5])


def test_peft_model_defaults_to_lora_modules():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model(64), LoraConfig(r=2, target_modules=["q_proj", "v_proj", "down_proj"]))
    names = resolve_tracked_modules(model, layers=[0])
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert any("down_proj.lora_B" in n for n in names) and any("q_proj.lora_A" in n for n in names)
