"""Export an SD3 pipeline's networks to ONNX, optionally with onnxruntime int8 dynamic quantization.

Exported graphs (one ``.onnx`` file each, plus ``sd35flash-onnx.json``, the manifest):

* ``transformer``: hidden_states, timestep (``1000 t``), encoder_hidden_states, pooled_projections
  -> sample (the velocity);
* ``vae_decoder``: latents (already mapped by ``z / scaling + shift``) -> image in [-1, 1];
* ``text_encoder`` / ``text_encoder_2`` (CLIP-L / CLIP-G): input_ids -> text_embeds,
  last_hidden_state, hidden_state_0 .. hidden_state_L;
* ``text_encoder_3`` (T5, when the pipeline has it): input_ids -> last_hidden_state.

Only the batch axis is dynamic (classifier-free guidance doubles it). The latent grid (default: the
transformer's ``sample_size``; ``resolution=`` picks another), the CLIP length and the T5 length (what
:func:`sd35flash.sampling.clip_length` / ``t5_length`` pad to) are fixed at export time: the SD3
position-embedding crop is specialised by ``torch.export`` anyway, T5's attention reshapes do not
export with a symbolic length, and every symbolic axis makes the export several times slower.
The wrappers check these sizes and name the mismatch.

Exporter: ``torch.onnx.export(..., dynamo=True)``, the ``torch.export``-based exporter that is the
default since torch 2.9 (the TorchScript exporter also works on torch 2.13 and was ~15x faster on the
tiny transformer, but it is deprecated, so it is not used). Graphs are exported in float32 on the CPU;
modules in another dtype or on another device are copied to float32 CPU first (so exporting an
SD3.5-size model needs its float32 size in host memory once). Graphs above 1 GiB keep their weights
in an external data file beside the ``.onnx`` file (ONNX protobufs stop at 2 GiB).

int8: ``onnxruntime.quantization.quantize_dynamic`` with int8 weights on ``MatMul`` and ``Gather``
(linear layers and embedding tables) of the transformer and the text encoders; activations are
quantised on the fly per tensor. The VAE decoder stays float32, the "fp32 rest" of the
``cpu-onnx-int8`` recipe (``ConvInteger`` quantisation of its convolutions was not tried).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sd35flash.checksums import write_checksums
from sd35flash.errors import UserError
from sd35flash.fingerprints import hash_module_exact
from sd35flash.io import atomic_write_json, check_model_output, copy_dir, staged_dir

__all__ = [
    "GRAPHS",
    "MANIFEST",
    "MissingPartError",
    "check_export_parts",
    "copy_export",
    "export_onnx",
    "pipeline_fingerprint",
    "quantize_export",
]

MANIFEST = "sd35flash-onnx.json"
FORMAT_VERSION = 1
EXPORTER = "torch.onnx.export(dynamo=True)"
EXTERNAL_DATA_BYTES = 1 << 30

# ONNX graph name -> the pipeline attribute it replaces.
GRAPHS: dict[str, str] = {
    "transformer": "transformer",
    "vae_decoder": "vae",
    "text_encoder": "text_encoder",
    "text_encoder_2": "text_encoder_2",
    "text_encoder_3": "text_encoder_3",
}
QUANTIZED_GRAPHS = ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
REQUIRED_PARTS = ("transformer", "vae", "text_encoder", "text_encoder_2")


class MissingPartError(UserError):
    """A pipeline folder lacks a component the export needs."""


# ----------------------------------------------------------------------------- model folder checks


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.bin")) or any(folder.glob("*.index.json"))


def check_export_parts(folder: str | os.PathLike[str]) -> list[str]:
    """The pipeline parts of ``folder`` that will be exported; a :class:`MissingPartError` names the
    first required part that is missing.

    Required: ``transformer``, ``vae``, ``text_encoder``, ``text_encoder_2``, each a sub-folder with
    a ``config.json`` and weights. ``text_encoder_3`` (T5) is exported when ``model_index.json``
    lists it (then it must be present too); a pipeline saved without T5 (``[null, null]``) is fine.
    """
    root = Path(folder).expanduser()
    index = root / "model_index.json"
    if not root.is_dir():
        raise MissingPartError(f"model folder {root} does not exist; pass an SD3 pipeline folder")
    if not index.is_file():
        raise MissingPartError(f"{root} is missing model_index.json; pass an SD3 pipeline folder (save_pretrained)")
    try:
        listed = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MissingPartError(f"{root}/model_index.json is unreadable ({exc})") from exc
    parts = list(REQUIRED_PARTS)
    entry = listed.get("text_encoder_3")
    if isinstance(entry, list) and entry and entry[0] is not None:
        parts.append("text_encoder_3")
    for part in parts:
        entry = listed.get(part)
        sub = root / part
        if not (isinstance(entry, list) and entry and entry[0] is not None):
            problem = "model_index.json does not list it"
        elif not sub.is_dir():
            problem = f"no {part}/ folder"
        elif not (sub / "config.json").is_file():
            problem = f"no {part}/config.json"
        elif not _has_weights(sub):
            problem = f"no weights in {part}/"
        else:
            continue
        raise MissingPartError(f"cannot export {root}: the {part} part is missing ({problem})")
    return parts


# ----------------------------------------------------------------------------- fingerprint


def pipeline_fingerprint(pipe, settings: dict[str, Any] | None = None, length: int = 16) -> str:
    """A hash of every exported part (class, config, every tensor's bytes) plus the export settings.

    Two pipelines with identical weights get the same fingerprint wherever they were loaded from, so
    an ONNX export cached under it is reused; any change to a weight changes it.
    """
    h = hashlib.blake2b(digest_size=32)
    h.update(f"sd35flash-onnx-v{FORMAT_VERSION}:torch-{torch.__version__}".encode())
    h.update(json.dumps(settings or {}, sort_keys=True).encode())
    for graph, attr in GRAPHS.items():
        module = getattr(pipe, attr, None)
        if module is None:
            h.update(f"{graph}:absent".encode())
            continue
        if not isinstance(module, torch.nn.Module) or getattr(module, "is_onnx", False):
            raise UserError(f"the pipeline's {attr} is not a PyTorch module (already ONNX-backed?); "
                            "load the model again")
        h.update(graph.encode())
        hash_module_exact(h, module)
    return h.hexdigest()[:length]


# ----------------------------------------------------------------------------- graphs


class _TransformerGraph(torch.nn.Module):
    def __init__(self, transformer: torch.nn.Module) -> None:
        super().__init__()
        self.transformer = transformer

    def forward(self, hidden_states, timestep, encoder_hidden_states, pooled_projections):
        return self.transformer(hidden_states=hidden_states, timestep=timestep,
                                encoder_hidden_states=encoder_hidden_states, pooled_projections=pooled_projections,
                                return_dict=False)[0]


class _VaeDecoderGraph(torch.nn.Module):
    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return self.vae.decode(latents, return_dict=False)[0]


class _ClipGraph(torch.nn.Module):
    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids):
        out = self.encoder(input_ids, output_hidden_states=True)
        return (out.text_embeds, out.last_hidden_state, *out.hidden_states)


class _T5Graph(torch.nn.Module):
    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids):
        return self.encoder(input_ids)[0]


@dataclass
class _GraphSpec:
    module: torch.nn.Module
    args: tuple[torch.Tensor, ...]
    input_names: list[str]
    output_names: list[str]
    dynamic_shapes: dict[str, dict[int, Any]]
    config: dict[str, Any]


def _config_dict(module: torch.nn.Module) -> dict[str, Any]:
    cfg = module.config
    data = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    return json.loads(json.dumps(data, default=str))


def _vae_scale(pipe) -> int:
    return 2 ** (len(pipe.vae.config.block_out_channels) - 1)


def _graph_specs(pipe, resolution: int | None) -> dict[str, _GraphSpec]:
    """What to trace for each graph: the module, example inputs (batch 2, so that batch stays symbolic)
    and the dynamic axes."""
    from sd35flash.sampling import clip_length, t5_length

    Dim = torch.export.Dim
    batch = Dim("batch", min=1, max=4096)
    tr = pipe.transformer
    scale = _vae_scale(pipe)
    side = (resolution // scale) if resolution else int(tr.config.sample_size)
    if resolution and resolution % (scale * tr.config.patch_size):
        raise UserError(f"--resolution {resolution} must be a multiple of {scale * tr.config.patch_size} "
                        "for this model")
    clip_len, t5_len = clip_length(pipe), t5_length(pipe)
    text_len = clip_len + t5_len
    gen = torch.Generator().manual_seed(0)
    specs: dict[str, _GraphSpec] = {}
    specs["transformer"] = _GraphSpec(
        _TransformerGraph(tr),
        (torch.randn(2, tr.config.in_channels, side, side, generator=gen), torch.tensor([500.0, 250.0]),
         torch.randn(2, text_len, tr.config.joint_attention_dim, generator=gen),
         torch.randn(2, tr.config.pooled_projection_dim, generator=gen)),
        ["hidden_states", "timestep", "encoder_hidden_states", "pooled_projections"], ["sample"],
        {"hidden_states": {0: batch}, "timestep": {0: batch}, "encoder_hidden_states": {0: batch},
         "pooled_projections": {0: batch}},
        _config_dict(tr),
    )
    vae = pipe.vae
    specs["vae_decoder"] = _GraphSpec(
        _VaeDecoderGraph(vae), (torch.randn(2, vae.config.latent_channels, side, side, generator=gen),),
        ["latents"], ["image"],
        {"latents": {0: batch}},
        _config_dict(vae),
    )
    for attr in ("text_encoder", "text_encoder_2"):
        enc = getattr(pipe, attr)
        n_hidden = enc.config.num_hidden_layers + 1
        ids = torch.randint(0, enc.config.vocab_size, (2, clip_len), generator=gen)
        specs[attr] = _GraphSpec(
            _ClipGraph(enc), (ids,), ["input_ids"],
            ["text_embeds", "last_hidden_state", *[f"hidden_state_{i}" for i in range(n_hidden)]],
            {"input_ids": {0: batch}}, _config_dict(enc),
        )
    t5 = getattr(pipe, "text_encoder_3", None)
    if t5 is not None:
        ids = torch.randint(0, t5.config.vocab_size, (2, t5_len), generator=gen)
        specs["text_encoder_3"] = _GraphSpec(_T5Graph(t5), (ids,), ["input_ids"], ["last_hidden_state"],
                                             {"input_ids": {0: batch}}, _config_dict(t5))
    return specs


def _param_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * 4 for t in module.state_dict().values())


@contextmanager
def _float32_cpu(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``module`` itself when already float32 on the CPU, else a float32 CPU copy; eval mode."""
    params = list(module.parameters())
    same = all(p.dtype == torch.float32 and p.device.type == "cpu" for p in params)
    m = module if same else copy.deepcopy(module).to(device="cpu", dtype=torch.float32)
    was_training = m.training
    m.eval()
    try:
        yield m
    finally:
        m.train(was_training)
        if m is not module:
            del m


def _export_graph(spec: _GraphSpec, path: Path) -> None:
    import warnings

    external = _param_bytes(spec.module) > EXTERNAL_DATA_BYTES
    with _float32_cpu(spec.module) as m, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            m, spec.args, str(path), dynamo=True, input_names=spec.input_names, output_names=spec.output_names,
            dynamic_shapes={name: spec.dynamic_shapes.get(name, {}) for name in spec.input_names},
            external_data=external, verbose=False, optimize=True,
        )


def _describe_io(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def dims(value_info) -> list[int | str]:
        return [d.dim_param if d.dim_param else int(d.dim_value) for d in value_info.type.tensor_type.shape.dim]

    ins = [{"name": v.name, "shape": dims(v)} for v in model.graph.input]
    outs = [{"name": v.name, "shape": dims(v)} for v in model.graph.output]
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return ins, outs, opset


def _graph_files(folder: Path, graph: str) -> list[Path]:
    return [p for p in folder.iterdir() if p.name == f"{graph}.onnx" or p.name.startswith(f"{graph}.onnx.")]


def _folder_bytes(folder: Path, graph: str) -> int:
    return sum(p.stat().st_size for p in _graph_files(folder, graph))


# ----------------------------------------------------------------------------- output folders


def ensure_writable_dir(path: str | os.PathLike[str], what: str) -> Path:
    """Create ``path`` if needed and check that files can be written in it (one-line error if not)."""
    p = Path(path).expanduser()
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".write-test-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"{what} {p} is not writable ({exc.strerror or exc}); pass a folder you can write to") from None
    return p


# ----------------------------------------------------------------------------- export


@contextmanager
def _staged_export(target: Path) -> Iterator[Path]:
    """:func:`sd35flash.io.staged_dir` with ``checksums.sha256`` written last, before the swap."""
    with staged_dir(target, "export folder") as tmp:
        yield tmp
        write_checksums(tmp)


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    atomic_write_json(folder / MANIFEST, manifest, "export manifest")


def export_onnx(pipe, out_dir: str | os.PathLike[str], int8: bool = False, resolution: int | None = None,
                progress: bool = True) -> Path:
    """Export ``pipe``'s transformer, VAE decoder and text encoders to ONNX files in ``out_dir``.

    With ``int8`` the float32 graphs are exported to a temporary folder first and
    :func:`quantize_export` writes the quantised ones to ``out_dir``. The folder is written next to
    its final place and renamed when complete, so an interrupted export leaves nothing behind.
    Returns ``out_dir``.
    """
    import onnx
    import onnxruntime
    from tqdm.auto import tqdm

    target = Path(out_dir).expanduser()
    ensure_writable_dir(target.parent, "output folder")
    if int8:
        with tempfile.TemporaryDirectory(prefix=".onnx-fp32-", dir=target.parent) as tmp:
            fp32 = export_onnx(pipe, Path(tmp) / "fp32", int8=False, resolution=resolution, progress=progress)
            return quantize_export(fp32, target, progress=progress)
    settings = _export_settings(pipe, resolution)
    specs = _graph_specs(pipe, resolution)
    with _staged_export(target) as tmp:
        graphs: dict[str, Any] = {}
        opset = 0
        for graph, spec in tqdm(list(specs.items()), desc="ONNX export", disable=not progress):
            path = tmp / f"{graph}.onnx"
            _export_graph(spec, path)
            ins, outs, opset = _describe_io(path)
            graphs[graph] = {"file": path.name, "replaces": GRAPHS[graph], "inputs": ins, "outputs": outs,
                             "config": spec.config, "bytes": _folder_bytes(tmp, graph), "int8": False}
        manifest = {
            "format_version": FORMAT_VERSION, "exporter": EXPORTER, "opset": opset, "int8": False,
            "fingerprint": pipeline_fingerprint(pipe, settings), "settings": settings,
            "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
            "graphs": graphs,
        }
        _write_manifest(tmp, manifest)
    return target


def _export_settings(pipe, resolution: int | None) -> dict[str, Any]:
    from sd35flash.sampling import clip_length, t5_length

    side = (resolution // _vae_scale(pipe)) if resolution else int(pipe.transformer.config.sample_size)
    return {"latent_side": side, "clip_length": clip_length(pipe), "t5_length": t5_length(pipe)}


def read_manifest(folder: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(folder).expanduser() / MANIFEST
    if not path.is_file():
        raise UserError(f"{Path(folder)} is not an ONNX export of sd35flash (no {MANIFEST}); run `sd35flash export`")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} is unreadable ({exc}); export again") from exc


def quantize_export(src_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], progress: bool = True) -> Path:
    """Write an int8 copy of the float32 export in ``src_dir`` to ``out_dir``.

    ``quantize_dynamic`` (weights int8 per tensor, activations quantised at run time) on the
    transformer and text encoders, ``MatMul`` and ``Gather`` nodes only; the VAE decoder is copied
    unchanged. Written to a temporary sibling folder and renamed when complete.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from tqdm.auto import tqdm

    src = Path(src_dir).expanduser()
    manifest = read_manifest(src)
    if manifest.get("int8"):
        raise UserError(f"{src} is already an int8 export")
    target = Path(out_dir).expanduser()
    ensure_writable_dir(target.parent, "output folder")
    with _staged_export(target) as tmp:
        for graph, info in tqdm(list(manifest["graphs"].items()), desc="int8 quantization", disable=not progress):
            if graph in QUANTIZED_GRAPHS:
                external = info["bytes"] > EXTERNAL_DATA_BYTES
                quantize_dynamic(src / info["file"], tmp / info["file"], weight_type=QuantType.QInt8,
                                 op_types_to_quantize=["MatMul", "Gather"], use_external_data_format=external)
                info["int8"] = True
            else:
                for f in _graph_files(src, graph):
                    shutil.copy2(f, tmp / f.name)
            info["bytes"] = _folder_bytes(tmp, graph)
        manifest["int8"] = True
        _write_manifest(tmp, manifest)
    return target


def copy_export(src_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
    """Place a finished export at ``out_dir`` (hard links where the file system allows, else copies),
    replacing what was there only once the new folder is complete."""
    src = Path(src_dir).expanduser()
    read_manifest(src)
    target = check_export_output(out_dir)
    return copy_dir(src, target, "export folder", link=True)


def check_export_output(out_dir: str | os.PathLike[str]) -> Path:
    """``--out`` of ``export``: writable, and an existing folder only when it is an export (holds
    ``sd35flash-onnx.json``) or empty, so a user's other files are never replaced."""
    return check_model_output(out_dir, "--out", marker=MANIFEST)
