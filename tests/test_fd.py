"""Tests for sd35flash.evaluate.fd (EfficientNet-Lite0 Frechet distance). Small sets, CPU, < 60 s."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sd35flash.errors import UserError
from sd35flash.evaluate.fd import (
    FEATURE_DIM,
    EffNetLite0Features,
    FDScorer,
    frechet_distance,
    gaussian_stats,
)

N = 32
SIZE = 64


def _shapes(n: int, seed: int, size: int = SIZE) -> np.ndarray:
    """Coloured discs and rectangles on a flat random background, (n, size, size, 3) uint8."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        img = np.broadcast_to(rng.integers(0, 256, 3), (size, size, 3)).copy()
        for _ in range(rng.integers(1, 4)):
            colour = rng.integers(0, 256, 3)
            cy, cx = rng.integers(0, size, 2)
            r = rng.integers(size // 10, size // 3)
            if rng.random() < 0.5:
                mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            else:
                mask = (abs(yy - cy) <= r) & (abs(xx - cx) <= r // 2 + 1)
            img[mask] = colour
        out[i] = img
    return out


def _noise(n: int, seed: int, size: int = SIZE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def scorer() -> FDScorer:
    return FDScorer(batch_size=32)


@pytest.fixture(scope="module")
def sets(scorer: FDScorer) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Images and their features, computed once for the module."""
    imgs = {
        "shapes_a": _shapes(N, 1),
        "shapes_b": _shapes(N, 2),
        "noise_a": _noise(N, 3),
        "noise_b": _noise(N, 4),
    }
    return {k: (v, scorer.features(v)) for k, v in imgs.items()}


def test_extractor_shape_dtype_and_frozen(scorer: FDScorer) -> None:
    ext = scorer.extractor
    assert ext.num_features == FEATURE_DIM
    ext.train()
    assert not ext.training and not any(m.training for m in ext.modules())
    assert not any(p.requires_grad for p in ext.parameters())
    out = ext(torch.randint(0, 256, (2, 3, 299, 299), dtype=torch.uint8))  # torchmetrics' dummy size
    assert out.shape == (2, FEATURE_DIM) and out.dtype == torch.float64
    assert torch.isfinite(out).all()


def test_torchmetrics_accepts_custom_extractor(scorer: FDScorer) -> None:
    from torchmetrics.image.fid import FrechetInceptionDistance

    # (compute() is exercised by the FD tests below; it costs a 1280 x 1280 eigendecomposition.)
    metric = FrechetInceptionDistance(feature=scorer.extractor)
    assert metric.inception is scorer.extractor
    imgs = torch.from_numpy(_shapes(3, 9)).permute(0, 3, 1, 2).contiguous()
    metric.update(imgs, real=True)
    assert int(metric.real_features_num_samples) == 3
    assert metric.real_features_sum.shape == (FEATURE_DIM,)


def test_features_deterministic_and_batch_invariant(scorer: FDScorer, sets) -> None:
    imgs, feats = sets["shapes_a"]
    assert feats.shape == (N, FEATURE_DIM) and feats.dtype == np.float64
    imgs, feats = imgs[:8], feats[:8]
    again = scorer.features(imgs, batch_size=32)
    np.testing.assert_array_equal(again, scorer.features(imgs, batch_size=32))
    np.testing.assert_allclose(again, feats, rtol=1e-4, atol=1e-4)
    other_bs = scorer.features(imgs, batch_size=3)
    np.testing.assert_allclose(other_bs, feats, rtol=1e-4, atol=1e-4)


def test_fd_of_set_with_itself_is_zero(scorer: FDScorer, sets) -> None:
    imgs, feats = sets["shapes_a"]
    assert abs(scorer.fd(imgs[:16], imgs[:16])) < 1e-2
    assert abs(FDScorer.fd_from_features(feats, feats)) < 1e-8
    assert abs(frechet_distance(*gaussian_stats(feats), *gaussian_stats(feats))) < 1e-6


def test_fd_orders_sets_sensibly(sets) -> None:
    fd = FDScorer.fd_from_features
    noise_a, noise_b = sets["noise_a"][1], sets["noise_b"][1]
    shapes_a, shapes_b = sets["shapes_a"][1], sets["shapes_b"][1]
    self_fd = fd(noise_a, noise_a)
    noise_fd = fd(noise_a, noise_b)
    assert noise_fd > self_fd + 1e-3
    # Two draws of the same kind of image are closer than images of different kinds.
    assert fd(shapes_a, noise_a) > fd(shapes_a, shapes_b)
    assert fd(shapes_a, noise_a) > noise_fd


def test_fd_symmetric(sets) -> None:
    a, b = sets["shapes_a"][1], sets["noise_a"][1]
    ab, ba = FDScorer.fd_from_features(a, b), FDScorer.fd_from_features(b, a)
    assert ab > 0
    assert abs(ab - ba) <= 1e-6 * ab


def test_torchmetrics_path_matches_fd_from_features(scorer: FDScorer, sets) -> None:
    (ia, fa), (ib, fb) = sets["shapes_a"], sets["noise_b"]
    via_torchmetrics = scorer.fd(ia, ib)
    via_features = FDScorer.fd_from_features(fa, fb)
    assert via_features > 0
    assert abs(via_torchmetrics - via_features) <= 1e-3 * via_features


def test_fd_with_error_terms_and_bootstrap(scorer: FDScorer, sets) -> None:
    """FD's two terms add up to the torchmetrics value; the bootstrap SE is seeded, positive, and
    small next to a gap between unlike sets (shapes vs noise) but not next to like sets' FD."""
    (ia, _), (ib, _), (na, _) = sets["shapes_a"], sets["shapes_b"], sets["noise_a"]
    like = scorer.fd_with_error(ia, ib, bootstrap=8, seed=1)
    assert like["fd"] == pytest.approx(scorer.fd(ia, ib), rel=1e-3)
    assert like["mean_term"] + like["cov_term"] == pytest.approx(like["fd"]) and like["mean_term"] > 0
    assert like["se"] > 0 and scorer.fd_with_error(ia, ib, bootstrap=8, seed=1)["se"] == like["se"]
    unlike = scorer.fd_with_error(ia, na, bootstrap=8, seed=1)
    assert unlike["fd"] - like["fd"] > 5 * max(like["se"], unlike["se"])
    assert scorer.fd_with_error(ia, ib, bootstrap=0)["se"] is None
    with pytest.raises(UserError, match="paired sets of equal size"):
        scorer.fd_with_error(ia, ib[:-1])


def test_small_n_and_full_covariance_routes_agree(sets) -> None:
    # The first 256 feature dimensions keep the (D, D) eigendecompositions cheap; n = 32 < D still.
    fa, fb = sets["shapes_a"][1][:, :256], sets["shapes_b"][1][:, :256]
    nuclear = FDScorer.fd_from_features(fa, fb)  # n < D: (n1, n2) SVD route
    full = frechet_distance(*gaussian_stats(fa), *gaussian_stats(fb))  # (D, D) route
    assert abs(nuclear - full) <= 1e-6 * nuclear
    # Full route on a low-dimensional problem with n > D, against a closed form:
    # for commuting diagonal covariances, Tr((S1 S2)^1/2) = sum sqrt(s1_i s2_i).
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 1.0, 1.0])
    expected = 1.0 + 0.0 + 4.0 + (14.0 + 6.0) - 2.0 * (2.0 + 2.0 + 3.0)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(500, 8)), rng.normal(size=(400, 8)) * 2 + 1
    assert FDScorer.fd_from_features(x, y) == pytest.approx(
        frechet_distance(*gaussian_stats(x), *gaussian_stats(y)), rel=1e-9
    )


def test_too_few_images_is_a_user_error(scorer: FDScorer, sets) -> None:
    imgs, feats = sets["shapes_a"]
    with pytest.raises(UserError, match="at least 2"):
        scorer.fd(imgs[:1], imgs)
    with pytest.raises(UserError, match="at least 2"):
        scorer.fd(imgs, imgs[:0])
    with pytest.raises(UserError, match="at least 2"):
        scorer.features(imgs[:1])
    with pytest.raises(UserError, match="at least 2"):
        FDScorer.fd_from_features(feats[:1], feats)


def test_bad_inputs_are_user_errors(scorer: FDScorer) -> None:
    with pytest.raises(UserError):
        scorer.features(np.zeros((4, 8, 8), dtype=np.uint8))  # no channel axis
    with pytest.raises(UserError):
        scorer.features(np.zeros((4, 8, 8, 4), dtype=np.uint8))  # RGBA
    for other in (np.full((4, 8, 8, 3), 0.5, dtype=np.float32), torch.zeros(4, 8, 8, 3, dtype=torch.uint8),
                  list(np.zeros((4, 8, 8, 3), dtype=np.uint8))):  # only (N, H, W, 3) uint8 arrays
        with pytest.raises(UserError, match=r"expected an \(N, H, W, 3\) uint8 RGB array"):
            scorer.features(other)
    with pytest.raises(UserError):
        FDScorer.fd_from_features(np.zeros((4, 3)), np.zeros((4, 5)))


def test_extractor_can_be_shared() -> None:
    ext = EffNetLite0Features()
    a, b = FDScorer(extractor=ext), FDScorer(extractor=ext)
    assert a.extractor is b.extractor is ext
