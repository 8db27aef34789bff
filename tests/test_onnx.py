"""ONNX export + onnxruntime backend: parity with PyTorch on a tiny pipeline, cache reuse, bad input.

One float32 export of the tiny pipeline per module (through the CLI, into the test cache); the int8
export is quantised from it. The export is the slow part (torch.export-based exporter: ~20-60 s on
a busy 2-core machine).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from sd35flash.cli import main
from sd35flash.deploy.export import onnx_runtime
from sd35flash.deploy.export.onnx_export import MANIFEST, MissingPartError, check_export_parts, pipeline_fingerprint
from sd35flash.deploy.export.onnx_runtime import OrtTransformer, apply_onnx_backend
from sd35flash.models import load_pipeline, save_pipeline
from sd35flash.paths import cache_root
from sd35flash.sampling import encode_prompts, generate, scheduler_schedule

WORDS = "a an the small large red green blue circle square on left of and two".split()
#: The shared tiny pipeline made smaller still: ONNX export runs once per part.
SMALLER = dict(image_size=16, vae_block_out_channels=(8, 16), num_layers=1, text_max_length=8)
PROMPTS = ["a large red circle", "two blue squares"]


@pytest.fixture(scope="module")
def tiny_model(tiny_pipeline, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "tiny"
    save_pipeline(tiny_pipeline(words=WORDS, **SMALLER), out)
    return out


@pytest.fixture(scope="module")
def fp32_export(tiny_model, cache_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("onnx-out") / "fp32"
    assert main(["export", "--model", str(tiny_model), "--format", "onnx", "--out", str(out), "--no-progress"]) == 0
    return out


def _transformer_inputs(pipe, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cfg = pipe.transformer.config
    text = pipe.tokenizer.model_max_length + pipe.tokenizer_3.model_max_length
    return dict(hidden_states=torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g),
                timestep=torch.rand(batch, generator=g) * 1000,
                encoder_hidden_states=torch.randn(batch, text, cfg.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=g))


def test_export_folder_and_fp32_parity(tiny_model, fp32_export, tiny_config):
    manifest = json.loads((fp32_export / MANIFEST).read_text())
    assert set(manifest["graphs"]) == {"transformer", "vae_decoder", "text_encoder", "text_encoder_2", "text_encoder_3"}
    assert manifest["int8"] is False and manifest["exporter"].startswith("torch.onnx.export(dynamo=True)")
    assert manifest["graphs"]["transformer"]["inputs"][0]["shape"][0] == "batch"  # dynamic batch

    ref = load_pipeline(tiny_model)
    ort = onnx_runtime.load_onnx_modules(fp32_export)
    with torch.no_grad():
        for batch in (1, 3):
            kw = _transformer_inputs(ref, batch, seed=batch)
            want = ref.transformer(**kw, return_dict=False)[0]
            got = ort["transformer"](**kw, return_dict=False)[0]
            assert got.shape == want.shape
            assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()
        z = torch.randn(2, tiny_config.latent_channels, 8, 8)
        assert torch.allclose(ort["vae"].decode(z, return_dict=False)[0], ref.vae.decode(z, return_dict=False)[0],
                              atol=1e-4)
    with pytest.raises(Exception, match="exported with hidden_states"):
        ort["transformer"](**_transformer_inputs(ref, 1) | {"hidden_states": torch.randn(1, 4, 4, 4)})


def test_generate_through_ort_matches_pytorch(tiny_model, fp32_export, monkeypatch):
    ref = load_pipeline(tiny_model)
    # the export above went to the cache keyed by the weights' fingerprint: no second export
    monkeypatch.setattr(onnx_runtime, "export_onnx", lambda *a, **k: pytest.fail("exported twice"))
    pipe = apply_onnx_backend(load_pipeline(tiny_model), cache_root() / "onnx", int8=False)
    assert isinstance(pipe.transformer, OrtTransformer) and pipe.text_encoder_3.is_onnx
    graph = pipe.transformer.path  # bench's weights_gib counts the graph files, which hold the weights
    assert pipe.transformer.file_bytes == sum(f.stat().st_size for f in graph.parent.glob(graph.stem + "*")) > 0
    a, b = encode_prompts(ref, PROMPTS), encode_prompts(pipe, PROMPTS)
    assert torch.allclose(a.embeds, b.embeds, atol=1e-5) and torch.allclose(a.pooled, b.pooled, atol=1e-5)
    schedule = scheduler_schedule(ref, 4)
    want = generate(ref, PROMPTS, [3, 4], schedule, guidance=3.0)
    got = generate(pipe, PROMPTS, [3, 4], schedule, guidance=3.0)
    assert np.abs(want.astype(int) - got.astype(int)).max() <= 1
    # the stock diffusers pipeline runs on the swapped modules too
    kw = dict(num_inference_steps=3, guidance_scale=2.0, height=16, width=16, output_type="np",
              max_sequence_length=SMALLER["text_max_length"])
    stock_ref = ref(PROMPTS[0], generator=torch.Generator().manual_seed(5), **kw).images
    stock_ort = pipe(PROMPTS[0], generator=torch.Generator().manual_seed(5), **kw).images
    assert np.abs(stock_ref - stock_ort).max() < 2e-3
    # a changed weight is a different model
    ref.transformer.proj_out.bias.data += 1e-3
    assert pipeline_fingerprint(ref) != pipeline_fingerprint(load_pipeline(tiny_model))


def test_int8_export_close_and_smaller(tiny_model, fp32_export, tmp_path):
    out = tmp_path / "int8"
    assert main(["export", "--model", str(tiny_model), "--format", "onnx", "--out", str(out), "--int8",
                 "--no-progress"]) == 0
    manifest = json.loads((out / MANIFEST).read_text())
    graphs = manifest["graphs"]
    assert manifest["int8"] and graphs["transformer"]["int8"] and not graphs["vae_decoder"]["int8"]
    fp32 = json.loads((fp32_export / MANIFEST).read_text())["graphs"]
    assert graphs["transformer"]["bytes"] < 0.8 * fp32["transformer"]["bytes"]  # tiny: norms/biases stay fp32
    graph = onnx.load(str(out / "transformer.onnx")).graph
    weights = {t.name for t in graph.initializer}
    assert any(n.op_type == "MatMulInteger" for n in graph.node)
    assert not [n.name for n in graph.node if n.op_type == "MatMul" and set(n.input) & weights]  # no float weight left
    ref = load_pipeline(tiny_model)
    q = onnx_runtime.load_onnx_modules(out)["transformer"]
    with torch.no_grad():
        kw = _transformer_inputs(ref, 2)
        want = ref.transformer(**kw, return_dict=False)[0]
        got = q(**kw, return_dict=False)[0]
    rel = ((got - want).norm() / want.norm()).item()
    assert 0 < rel < 0.1, rel  # quantised (not identical), yet close
    pipe = apply_onnx_backend(load_pipeline(tiny_model), cache_root() / "onnx", int8=True)
    assert pipe.transformer.int8
    schedule = scheduler_schedule(ref, 4)
    want_img = generate(ref, PROMPTS, [3, 4], schedule, guidance=1.0).astype(int)
    got_img = generate(pipe, PROMPTS, [3, 4], schedule, guidance=1.0).astype(int)
    assert np.abs(want_img - got_img).mean() < 8.0


@pytest.mark.parametrize("part,damage", [("vae", "folder"), ("text_encoder_3", "weights"), ("transformer", "config")])
def test_export_missing_part_is_one_line_error(tiny_model, tmp_path, capsys, part, damage):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    if damage == "folder":
        shutil.rmtree(broken / part)
    elif damage == "weights":
        for f in (broken / part).glob("*.safetensors"):
            f.unlink()
    else:
        (broken / part / "config.json").unlink()
    with pytest.raises(MissingPartError, match=part):
        check_export_parts(broken)
    code = main(["export", "--model", str(broken), "--format", "onnx", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and f"the {part} part is missing" in err
    assert not (tmp_path / "o").exists()


def test_unwritable_cache_is_one_line_error(tiny_model, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(Exception, match="ONNX cache directory .* is not writable"):
        apply_onnx_backend(load_pipeline(tiny_model), blocker / "cache", int8=False)
