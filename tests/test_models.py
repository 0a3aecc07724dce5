import pytest

from infusion_lm.errors import ModelNotFoundError
from infusion_lm.text.models import load_model, resolve_model_source


def test_local_folder_loads(tiny_model_dir):
    model, tok = load_model(str(tiny_model_dir))
    assert model.config.num_hidden_layers == 2 and tok.pad_token_id is not None
    assert not model.training


def test_missing_path_lists_every_place_tried(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model_source(str(tmp_path / "nope"))
    assert "local folder" in str(err.value) and "nope" in str(err.value)
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model_source("someone/not-a-real-model")
    msg = str(err.value)
    assert "local folder" in msg and "Hugging Face cache" in msg and "offline" in msg


def test_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model_source(str(tmp_path))


def test_remote_code_is_off_by_default(monkeypatch, tiny_model_dir):
    seen = {}
    import transformers

    orig = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*a, **kw):
        seen["trust_remote_code"] = kw.get("trust_remote_code")
        return orig(*a, **kw)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    load_model(str(tiny_model_dir))
    assert seen["trust_remote_code"] is False
