"""Fast tests of sd35flash.models: offline tokenizers, the toy SD3 pipeline, folder I/O, sd35flash.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from transformers import AutoTokenizer, CLIPTokenizer, T5Tokenizer

from sd35flash.errors import UserError
from sd35flash.models import (
    FILENAME,
    StudentInfo,
    ToyConfig,
    build_clip_tokenizer,
    build_t5_tokenizer,
    build_transformer,
    count_parameters,
    is_local_path,
    load_pipeline,
    read_student_info,
    save_pipeline,
    write_student_info,
)

WORDS = (
    "a an the small large red green blue yellow purple orange cyan white circle circles square squares "
    "triangle triangles diamond diamonds on left right top bottom of above below and one two three"
).split()
PROMPTS = ["a large red circle", "three white diamonds", "a blue square left of a green triangle", "Zebra QX 42!"]



@pytest.fixture(scope="module")
def toy_dir(tiny_pipeline, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny pipeline with this module's larger vocabulary and an extra file, saved."""
    out = tmp_path_factory.mktemp("toy") / "teacher"
    save_pipeline(tiny_pipeline(words=WORDS), out, extra_files={"notes/hello.txt": "hi"})
    return out


# ---------------------------------------------------------------- tokenizers


@pytest.mark.parametrize("kind", ["clip", "t5"])
def test_tokenizer_known_words_single_and_reload_identical(kind: str, tmp_path: Path) -> None:
    build = build_clip_tokenizer if kind == "clip" else build_t5_tokenizer
    cls = CLIPTokenizer if kind == "clip" else T5Tokenizer
    tok = build(WORDS, 12)
    assert tok.model_max_length == 12
    specials = 2 if kind == "clip" else 1  # bos+eos for CLIP, eos for T5
    for word in WORDS:
        ids = tok(word, add_special_tokens=False).input_ids
        assert len(ids) == 1, (word, tok.convert_ids_to_tokens(ids))
        assert len(tok(word).input_ids) == 1 + specials
    unknown = tok("zebra", add_special_tokens=False).input_ids
    assert len(unknown) > 1 and tok.unk_token_id not in unknown  # unknown words split into pieces

    tok.save_pretrained(tmp_path / "a")
    for loader in (AutoTokenizer, cls):
        again = loader.from_pretrained(tmp_path / "a")
        assert type(again) is cls
        assert again.model_max_length == 12
        for prompt in PROMPTS:
            assert again(prompt).input_ids == tok(prompt).input_ids
            kwargs = {"padding": "max_length", "max_length": 12, "truncation": True}
            assert again(prompt, **kwargs).input_ids == tok(prompt, **kwargs).input_ids

    # Deterministic: the same word set (in any order) gives byte-identical files.
    build(list(reversed(WORDS)) + WORDS[:3], 12).save_pretrained(tmp_path / "b")
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_clip_padding_and_pooling_token() -> None:
    tok = build_clip_tokenizer(WORDS, 12)
    ids = tok("a red circle", padding="max_length", max_length=12).input_ids
    assert ids[0] == tok.bos_token_id and len(ids) == 12
    assert ids[4:] == [tok.eos_token_id] * 8  # pad = <|endoftext|>; first eos ends the prompt
    assert tok.decode(ids, skip_special_tokens=True) == "a red circle"


# ---------------------------------------------------------------- toy pipeline


def test_toy_config_constraints() -> None:
    with pytest.raises(UserError, match="t5_d_model"):
        build_transformer(ToyConfig(clip_hidden=64, t5_d_model=96))


def test_toy_pipeline_roundtrip_and_sampling(toy_dir: Path, tiny_config) -> None:
    assert (toy_dir / "notes" / "hello.txt").read_text() == "hi"
    assert not [p for p in toy_dir.parent.iterdir() if p.name.startswith(".")]  # no temp leftovers
    pipe = StableDiffusion3Pipeline.from_pretrained(toy_dir)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(
        num_inference_steps=2,
        height=32,
        width=32,
        output_type="np",
        max_sequence_length=tiny_config.text_max_length,
        generator=torch.Generator().manual_seed(0),
    )
    image = pipe("a large red circle", **kwargs).images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()

    pipe.text_encoder_3, pipe.tokenizer_3 = None, None  # SD3 then feeds zeros in place of T5
    kwargs["generator"] = torch.Generator().manual_seed(0)
    image = pipe("a large red circle", guidance_scale=1.0, **kwargs).images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()


def test_build_is_deterministic_and_keeps_global_rng(tiny_config) -> None:
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a, b = build_transformer(tiny_config), build_transformer(tiny_config)
    assert torch.equal(torch.random.get_rng_state(), state)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    assert count_parameters(a) == sum(p.numel() for p in a.parameters())


# ---------------------------------------------------------------- load / save


def test_load_pipeline_local_folder(toy_dir: Path, tiny_config) -> None:
    assert is_local_path(str(toy_dir))
    pipe = load_pipeline(str(toy_dir))
    assert isinstance(pipe, StableDiffusion3Pipeline)
    assert pipe.transformer.config.in_channels == tiny_config.latent_channels


def test_load_pipeline_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_pipeline(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="not an SD3 pipeline folder"):
        load_pipeline(str(tmp_path))
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(UserError, match="FluxPipeline"):
        load_pipeline(str(tmp_path))


def test_is_local_path() -> None:
    assert not is_local_path("stabilityai/stable-diffusion-3.5-medium")
    assert is_local_path("./student") and is_local_path("/abs/student") and is_local_path("runs/a/teacher")
    assert is_local_path("teacher")


def test_save_pipeline_replaces_existing(toy_dir: Path, tmp_path: Path) -> None:
    pipe = load_pipeline(str(toy_dir))
    out = tmp_path / "model"
    save_pipeline(pipe, out, extra_files={"stale.txt": "old"})
    save_pipeline(pipe, out, extra_files={FILENAME: b"{}"})
    assert not (out / "stale.txt").exists() and (out / FILENAME).read_bytes() == b"{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    with pytest.raises(UserError):
        save_pipeline(pipe, out, extra_files={"../escape.txt": "x"})


# ---------------------------------------------------------------- sd35flash.json


def test_student_info_roundtrip_and_errors(tmp_path: Path) -> None:
    assert read_student_info(tmp_path) is None
    info = StudentInfo(timesteps=[1.0, 0.75, 0.5, 0.25], steps=4, needs_t5=False, teacher="t", extra={"k": 1})
    write_student_info(tmp_path, info)
    assert read_student_info(tmp_path) == info

    path = tmp_path / FILENAME
    for bad in ["{not json", '{"timesteps": [1.0, 0.5]}', '{"timesteps": [0.5, 1.0], "steps": 2}',
                '{"timesteps": [1.0, 0.5], "steps": 2, "colour": 1}', "[1, 2]"]:
        path.write_text(bad)
        with pytest.raises(UserError):
            read_student_info(tmp_path)
    with pytest.raises(UserError):
        write_student_info(tmp_path, StudentInfo(timesteps=[1.0, 0.5], steps=3))


@pytest.mark.parametrize("bad,names", [
    ('{"timesteps": [1.0, 0.5], "steps": 2, "colour": 1}', "unknown config key 'sd35flash.colour'"),
    ('{"timesteps": [1.0, "x"], "steps": 2}', "sd35flash.timesteps[1]: expected a number"),
    ('{"timesteps": [1.0, 0.5], "steps": 2, "needs_t5": "yes"}', "sd35flash.needs_t5: expected true or false"),
    ('{"timesteps": [1.0, 0.5], "steps": 2, "split": {"branches": [{"subfolder": "a", "t_mn": 0.5, "t_max": 1}],'
     ' "merge_weights": [1.0]}}', "'sd35flash.split.branches[0].t_mn'"),
])
def test_student_info_errors_name_the_key(tmp_path: Path, bad: str, names: str) -> None:
    """sd35flash.json is read like every config (config.from_dict): one line naming the key."""
    (tmp_path / FILENAME).write_text(bad)
    with pytest.raises(UserError) as exc:
        read_student_info(tmp_path)
    assert names in str(exc.value) and "\n" not in str(exc.value)


def test_student_sigmas_reproduce_schedule_in_stock_scheduler() -> None:
    info = StudentInfo(timesteps=[1.0, 0.9, 0.75, 0.5], steps=4)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    scheduler.set_timesteps(sigmas=info.sigmas(scheduler.config.shift))
    expected = torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0])
    torch.testing.assert_close(scheduler.sigmas, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(scheduler.timesteps, expected[:-1] * 1000, atol=1e-3, rtol=0)
    assert info.sigmas_for(scheduler) == info.sigmas(3.0)
    # Passing the student times unchanged would be shifted a second time:
    scheduler.set_timesteps(sigmas=info.timesteps)
    assert not torch.allclose(scheduler.sigmas, expected, atol=1e-3)
