"""Conversion from transformers' CLIP layout to open_clip's, checked against transformers itself.

Every model is written to disk the way users have them (save_pretrained, open_clip
directories, single .safetensors files) and read back through `fetch`.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from conftest import (
    TINY_ARCHITECTURE,
    make_base_state,
    write_open_clip_dir,
    make_expert_state,
    save_transformers_clip,
    save_transformers_expert,
    tiny_transformers_config,
)
from rankone.convert import transformers_to_open_clip
from rankone.errors import RankoneError
from rankone.models import build_clip, load_clip, tokenizer_for, visual_state
from rankone.sources import fetch
from rankone.workspace import Workspace

TEXTS = ["a photo of a cat.", "satellite image of a river", "x"]


def features(output) -> torch.Tensor:
    # transformers 5 returns a model output from get_*_features; older versions a tensor.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def images(seed: int = 0) -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("hidden_act", ["gelu", "quick_gelu"])
def test_fetched_transformers_models_match_transformers(tmp_path, hidden_act):
    base_model = save_transformers_clip(tmp_path / "base", hidden_act=hidden_act)
    expert_model = save_transformers_expert(tmp_path / "mnist", base_model, seed=3)
    workspace = Workspace(tmp_path / "work")
    fetch(workspace, str(tmp_path / "base"), {"mnist": str(tmp_path / "mnist")}, progress=False)

    architecture = workspace.architecture
    assert architecture["quick_gelu"] is (hidden_act == "quick_gelu")
    assert architecture["vision_cfg"] == {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 8, "mlp_ratio": 4.0}
    assert architecture["embed_dim"] == 16 and architecture["text_cfg"]["context_length"] == 16
    base_state = workspace.load_tensors("base.safetensors")
    model = load_clip(architecture, base_state)
    pixels = images()
    tokens = tokenizer_for(architecture)(TEXTS)
    # The same ids on both sides; transformers pools at eos_token_id 49407, open_clip at argmax.
    assert base_model.config.text_config.eos_token_id == 49407
    assert torch.equal(tokens.argmax(-1), (tokens == 49407).int().argmax(-1))
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(pixels), features(base_model.get_image_features(pixel_values=pixels)), atol=1e-5, rtol=0)
        torch.testing.assert_close(model.encode_text(tokens), features(base_model.get_text_features(input_ids=tokens)), atol=1e-5, rtol=0)
        assert torch.equal(model.logit_scale, base_model.logit_scale)

        # A CLIPVisionModel has no projection: the expert is projected with the base's.
        expert_state = workspace.load_tensors("experts/mnist.safetensors")
        assert set(expert_state) == set(visual_state(base_state))
        expert = load_clip(architecture, {**base_state, **expert_state})
        expected = base_model.visual_projection(expert_model(pixel_values=pixels).pooler_output)
        torch.testing.assert_close(expert.encode_image(pixels), expected, atol=1e-5, rtol=0)


def test_transformers_to_open_clip_is_a_pure_key_mapping():
    from transformers import CLIPModel

    torch.manual_seed(0)
    model = CLIPModel(tiny_transformers_config())
    state = model.state_dict()
    before = {key: value.clone() for key, value in state.items()}
    architecture, converted = transformers_to_open_clip(state, model.config.to_dict())
    assert all(torch.equal(state[key], before[key]) for key in state)
    assert set(converted) == set(build_clip(architecture).state_dict())
    assert not any("position_ids" in key for key in converted)
    layer = "vision_model.encoder.layers.1.self_attn."
    expected_in_proj = torch.cat([state[layer + "q_proj.weight"], state[layer + "k_proj.weight"], state[layer + "v_proj.weight"]])
    assert torch.equal(converted["visual.transformer.resblocks.1.attn.in_proj_weight"], expected_in_proj)
    assert torch.equal(converted["visual.proj"], state["visual_projection.weight"].t())
    assert torch.equal(converted["text_projection"], state["text_projection.weight"].t())
    assert torch.equal(converted["ln_final.weight"], state["text_model.final_layer_norm.weight"])
    assert torch.equal(converted["visual.ln_pre.bias"], state["vision_model.pre_layrnorm.bias"])


def test_legacy_eos_token_id_pools_the_same():
    from transformers import CLIPModel

    config = tiny_transformers_config()
    config.text_config.eos_token_id = 2  # configs written before transformers#24773: argmax pooling
    torch.manual_seed(1)
    model = CLIPModel(config).eval()
    architecture, converted = transformers_to_open_clip(model.state_dict(), model.config.to_dict())
    clip = load_clip(architecture, converted)
    tokens = tokenizer_for(architecture)(TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(clip.encode_text(tokens), features(model.get_text_features(input_ids=tokens)), atol=1e-5, rtol=0)


def test_unsupported_activation_names_the_setting(tmp_path):
    config = tiny_transformers_config().to_dict()
    config["vision_config"]["hidden_act"] = "relu"
    with pytest.raises(RankoneError, match="hidden_act 'relu'"):
        transformers_to_open_clip({}, config)


@pytest.mark.parametrize("layout", ["transformers-prefixed", "open_clip"])
def test_single_safetensors_expert_in_either_layout(tmp_path, transformers_models, layout):
    base_model, experts, base_dir, expert_dirs = transformers_models
    expert_model = experts["mnist"]
    vision = {key.removeprefix("vision_model."): value for key, value in expert_model.state_dict().items()}
    if layout == "transformers-prefixed":
        # FusionBench's files (older transformers) carry the `vision_model.` prefix.
        tensors = {f"vision_model.{key}": value for key, value in vision.items()}
    else:
        _, converted = transformers_to_open_clip({f"vision_model.{key}": value for key, value in vision.items()}, base_model.config.to_dict())
        tensors = converted
    path = tmp_path / "mnist.safetensors"
    save_file({key: value.contiguous() for key, value in tensors.items()}, path)

    workspace = Workspace(tmp_path / "work")
    fetch(workspace, str(base_dir), {"mnist": str(path)}, progress=False)
    manifest = workspace.manifest()
    assert manifest["sources"]["experts"]["mnist"]["kind"] == "file"
    architecture = workspace.architecture
    expert = load_clip(architecture, {**workspace.load_tensors("base.safetensors"), **workspace.load_tensors("experts/mnist.safetensors")})
    pixels = images(1)
    with torch.no_grad():
        expected = base_model.visual_projection(expert_model(pixel_values=pixels).pooler_output)
        torch.testing.assert_close(expert.encode_image(pixels), expected, atol=1e-5, rtol=0)


def test_open_clip_directories(tmp_path):
    base = make_base_state(0)
    expert = make_expert_state(base, seed=5)
    write_open_clip_dir(tmp_path / "base", base)
    write_open_clip_dir(tmp_path / "expert", {**base, **expert})  # a full CLIP fine-tuned on images
    workspace = Workspace(tmp_path / "work")
    fetch(workspace, str(tmp_path / "base"), {"dtd": str(tmp_path / "expert")}, progress=False)
    stored_base = workspace.load_tensors("base.safetensors")
    assert set(stored_base) == set(base) and all(torch.equal(stored_base[key], base[key]) for key in base)
    stored_expert = workspace.load_tensors("experts/dtd.safetensors")
    assert set(stored_expert) == set(expert) and all(torch.equal(stored_expert[key], expert[key]) for key in expert)
    assert workspace.architecture["vision_cfg"] == TINY_ARCHITECTURE["vision_cfg"]
    assert workspace.manifest()["sources"]["base"]["kind"] == "open_clip-dir"


def test_open_clip_pickle_needs_trust_pickle(tmp_path):
    base = make_base_state(0)
    write_open_clip_dir(tmp_path / "base", base, pickle=True)
    write_open_clip_dir(tmp_path / "expert", make_expert_state(base, seed=2))
    workspace = Workspace(tmp_path / "work")
    with pytest.raises(RankoneError, match=r"open_clip_pytorch_model\.bin.*--trust-pickle"):
        fetch(workspace, str(tmp_path / "base"), {"dtd": str(tmp_path / "expert")}, progress=False)
    assert not (tmp_path / "work").exists()
    fetch(workspace, str(tmp_path / "base"), {"dtd": str(tmp_path / "expert")}, trust_pickle=True, progress=False)
    stored = workspace.load_tensors("base.safetensors")
    assert all(torch.equal(stored[key], base[key]) for key in base)
