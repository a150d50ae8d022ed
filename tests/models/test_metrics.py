"""Tests for the image-quality metrics (models/metrics.py)."""
from __future__ import annotations

import json
import string

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from models import metrics as metrics_mod
from models.inception import InceptionFeatures, inception_weights_path
from models.metrics import (
    bootstrap_interval,
    clip_score,
    extract_features,
    feature_statistics,
    fid_from_statistics,
    inception_score,
    kernel_inception_distance,
    low_rank_frechet_distance,
    paired_difference,
    precision_recall,
    psnr,
    ssim,
)

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings(r"ignore:.*torch\.jit\.:FutureWarning")


# ---------------------------------------------------------------- PSNR / SSIM

def test_psnr_of_known_noise():
    a = torch.full((2, 3, 16, 16), 0.5)
    sign = torch.where(torch.rand_like(a) < 0.5, -1.0, 1.0)
    b = a + 0.1 * sign  # MSE exactly 0.01 -> 20 dB
    torch.testing.assert_close(psnr(a, b), torch.tensor([20.0, 20.0]))
    torch.testing.assert_close(psnr(a * 255, b * 255, max_val=255.0), torch.tensor([20.0, 20.0]))
    assert torch.isinf(psnr(a, a)).all()
    with pytest.raises(ValueError):
        psnr(a, b[:1])


def _ssim_reference(a: np.ndarray, b: np.ndarray) -> float:
    """skimage's structural_similarity(gaussian_weights=True, sigma=1.5, data_range=1), written with scipy."""
    c1, c2 = 0.01**2, 0.03**2
    values = []
    for x, y in zip(a, b):  # channels
        blur = lambda t: ndimage.gaussian_filter(t, sigma=1.5, truncate=3.5)  # noqa: E731
        mx, my = blur(x), blur(y)
        vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
        s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
        values.append(s[5:-5, 5:-5].mean())  # skimage crops (win_size - 1) // 2 = 5
    return float(np.mean(values))


def test_ssim_reference_values():
    rng = np.random.default_rng(0)
    a = rng.random((2, 3, 24, 20))
    b = np.clip(a + 0.1 * rng.standard_normal(a.shape), 0, 1)
    ours = ssim(torch.from_numpy(a), torch.from_numpy(b))
    expected = torch.tensor([_ssim_reference(a[i], b[i]) for i in range(2)], dtype=torch.float32)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    # Constant images: variances vanish and SSIM is the luminance term (2ab + C1) / (a^2 + b^2 + C1).
    const = ssim(torch.full((1, 1, 16, 16), 0.2), torch.full((1, 1, 16, 16), 0.6))
    assert const.item() == pytest.approx((2 * 0.2 * 0.6 + 1e-4) / (0.2**2 + 0.6**2 + 1e-4), rel=1e-6)


def test_ssim_identical_is_one_and_drops_with_noise():
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(ssim(x, x), torch.ones(2))
    noise = torch.randn_like(x)
    scores = [ssim(x, (x + s * noise).clamp(0, 1)).mean().item() for s in (0.02, 0.1, 0.3)]
    assert scores[0] > scores[1] > scores[2] and scores[0] < 1.0
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8))


# ---------------------------------------------------------------- FID

def test_fid_of_gaussian_features():
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((4000, 8)) @ rng.standard_normal((8, 8))
    mu, sigma = feature_statistics(feats)
    assert mu.shape == (8,) and sigma.shape == (8, 8)
    assert abs(fid_from_statistics(mu, sigma, mu, sigma)) < 1e-6
    shift = np.full(8, 0.5)  # same covariance, mean moved: FID = |shift|^2 = 2
    mu2, sigma2 = feature_statistics(feats + shift)
    assert fid_from_statistics(mu, sigma, mu2, sigma2) == pytest.approx(2.0, abs=1e-6)
    with pytest.raises(ValueError):
        feature_statistics(feats[:1])


@pytest.mark.parametrize("dim, n, m", [(16, 50, 40), (32, 12, 20)])
def test_low_rank_frechet_distance_equals_clean_fid(dim, n, m):
    rng = np.random.default_rng(dim)
    real = rng.normal(size=(n, dim)) @ rng.normal(size=(dim, dim))
    fake = rng.normal(size=(m, dim)) @ rng.normal(size=(dim, dim)) * 0.8 + 0.5
    mu_r, sigma_r = feature_statistics(real)
    expected = fid_from_statistics(mu_r, sigma_r, *feature_statistics(fake))
    assert low_rank_frechet_distance(real, fake) == pytest.approx(expected, rel=1e-6)
    assert low_rank_frechet_distance(real.astype(np.float32), fake, mu_r, sigma_r) == pytest.approx(expected, rel=1e-5)


def _write_pngs(folder, count=8):
    """Smooth random colour images of a non-square size, saved as real PNG files."""
    rng = np.random.default_rng(1)
    folder.mkdir()
    images = []
    for i in range(count):
        low = rng.random((6, 5, 3)) * 255
        img = Image.fromarray(low.astype(np.uint8)).resize((50, 60), Image.BICUBIC)
        arr = np.clip(np.asarray(img, dtype=np.float64) + rng.normal(0, 8, (60, 50, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"{i:03d}.png")
        images.append(arr)
    return np.stack(images)


def test_extract_features_equals_cleanfid_folder_features(tmp_path):
    """Our features equal clean-fid's own folder pipeline (PNG -> PIL resize -> InceptionV3W)."""
    from cleanfid.fid import get_folder_features
    from cleanfid.inception_torchscript import InceptionV3W

    images = _write_pngs(tmp_path / "imgs")
    scripted = torch.jit.load(str(inception_weights_path()), map_location="cpu")
    torch.jit.save(scripted.net, str(tmp_path / "inception-2015-12-05.pt"))
    reference = InceptionV3W(str(tmp_path), download=False).eval()
    folder_kwargs = dict(num_workers=0, batch_size=4, device=torch.device("cpu"), mode="clean", verbose=False)
    expected = get_folder_features(str(tmp_path / "imgs"), model=reference, **folder_kwargs)

    net = InceptionFeatures()
    ours = extract_features([images[:5], images[5:]], net, batch_size=3)
    assert set(ours) == {"pool"} and ours["pool"].shape == (8, 2048)
    # 1e-4: the folded network (models.inception) rounds differently from the scripted one.
    np.testing.assert_allclose(ours["pool"], expected, rtol=1e-4, atol=1e-4)

    # Our network is also a drop-in custom_feat_extractor for clean-fid.
    custom = get_folder_features(str(tmp_path / "imgs"), model=lambda x: net.forward_clean(x)["pool"], **folder_kwargs)
    np.testing.assert_allclose(custom, expected, rtol=1e-4, atol=1e-5)

    # Float tensors in [0,1] are rounded to uint8 like saved PNGs, so they give the same features.
    as_tensor = (torch.from_numpy(images[:2]).permute(0, 3, 1, 2).double() - 0.4) / 255
    np.testing.assert_allclose(extract_features([as_tensor], net)["pool"], expected[:2], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- KID

_MIXING = np.random.default_rng(123).standard_normal((64, 2048)) / 8


def _inception_like(rng, n, scale=1.0):
    """Non-negative, correlated features like Inception pool outputs (averages of ReLUs)."""
    return np.abs(rng.standard_normal((n, 64)) @ _MIXING) * scale


@pytest.mark.parametrize("use_gram", [True, False])
def test_kid_equals_clean_fid_with_the_same_draws(monkeypatch, use_gram):
    from cleanfid.fid import kernel_distance

    if not use_gram:  # the per-subset matmul path taken for large sets
        monkeypatch.setattr(metrics_mod, "_KID_GRAM_MAX_SAMPLES", 0)
    rng = np.random.default_rng(0)
    real, fake = _inception_like(rng, 420), _inception_like(rng, 350, scale=1.1)
    ours = kernel_inception_distance(real, fake, num_subsets=12, max_subset_size=200, seed=5)
    assert (ours.subsets, ours.subset_size) == (12, 200)

    # clean-fid draws from the global generator: fake subset, then real subset, per subset.
    np.random.seed(5)
    assert ours.mean == pytest.approx(kernel_distance(real, fake, num_subsets=12, max_subset_size=200), rel=1e-6)
    # clean-fid returns no std; one subset per call continues the same global draw sequence.
    np.random.seed(5)
    per_subset = [kernel_distance(real, fake, num_subsets=1, max_subset_size=200) for _ in range(12)]
    assert ours.mean == pytest.approx(np.mean(per_subset), rel=1e-6)
    assert ours.std == pytest.approx(np.std(per_subset), rel=1e-6) and ours.std > 0

    # A private generator: same seed, same answer, and the global numpy state is not consumed.
    np.random.seed(9)
    before = np.random.random()
    np.random.seed(9)
    assert kernel_inception_distance(real, fake, num_subsets=12, max_subset_size=200, seed=5) == ours
    assert np.random.random() == before
    assert kernel_inception_distance(real, fake, num_subsets=12, max_subset_size=200, seed=6).mean != ours.mean


def test_kid_equals_torch_fidelity():
    """torch-fidelity draws with RandomState(seed) too (input 1 first) and reports mean and std."""
    kid_metric = pytest.importorskip("torch_fidelity.metric_kid")
    rng = np.random.default_rng(1)
    real, fake = _inception_like(rng, 300), _inception_like(rng, 260, scale=1.1)
    ours = kernel_inception_distance(real, fake, num_subsets=20, max_subset_size=100, seed=7)
    theirs = kid_metric.kid_features_to_metric(torch.from_numpy(fake), torch.from_numpy(real), kid_subsets=20,
                                               kid_subset_size=100, rng_seed=7, verbose=False, kid_degree=3,
                                               kid_gamma=None, kid_coef0=1)
    assert ours.mean == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-6)
    assert ours.std == pytest.approx(theirs["kernel_inception_distance_std"], rel=1e-6)


def test_kid_is_unbiased_and_its_std_is_the_subset_spread():
    rng = np.random.default_rng(2)
    real, same, shifted = _inception_like(rng, 300), _inception_like(rng, 300), _inception_like(rng, 300, scale=1.2)
    null = kernel_inception_distance(real, same, num_subsets=50, max_subset_size=150)
    far = kernel_inception_distance(real, shifted, num_subsets=50, max_subset_size=150)
    # Unbiased: two samples of one distribution score ~0 (either sign), unlike FID's positive bias.
    assert abs(null.mean) < 0.05 * far.mean and far.mean > 5 * far.std
    # Equal sets no larger than max_subset_size: every subset is the whole set, so no spread.
    whole = kernel_inception_distance(real, shifted)
    assert whole.subset_size == 300 and whole.std < 1e-12 * abs(whole.mean)
    assert kernel_inception_distance(real[:40], shifted).subset_size == 40
    with pytest.raises(ValueError, match="dimension"):
        kernel_inception_distance(real, shifted[:, :10])
    with pytest.raises(ValueError, match="N >= 2"):
        kernel_inception_distance(real[:1], shifted)


# ---------------------------------------------------------------- Inception Score

def test_inception_score_uniform_vs_peaked():
    n, k = 1000, 10
    mean, std = inception_score(probs=np.full((n, k), 1.0 / k))
    assert mean == pytest.approx(1.0) and std == pytest.approx(0.0, abs=1e-9)
    # Confident and evenly spread over k classes in every split: IS = k.
    logits = 50.0 * np.eye(k)[np.arange(n) % k]
    mean, std = inception_score(logits=logits, splits=10)
    assert mean == pytest.approx(k, rel=1e-4) and std < 1e-6
    # Confident but always the same class: IS = 1.
    assert inception_score(logits=50.0 * np.eye(k)[np.zeros(n, dtype=int)])[0] == pytest.approx(1.0, rel=1e-4)
    with pytest.raises(ValueError, match="exactly one"):
        inception_score()
    with pytest.raises(ValueError, match="sum to 1"):
        inception_score(probs=logits)


# ---------------------------------------------------------------- precision / recall

def test_precision_recall_hand_computed():
    real = np.array([[0.0], [1.0], [2.0], [3.0], [10.0]])
    fake = np.array([[-1.5], [5.0], [20.0]])
    # k=1 real radii: 1, 1, 1, 1, 7 -> only 5.0 (within 7 of 10.0) is inside; fake radii 6.5, 6.5, 15 cover all reals.
    assert precision_recall(real, fake, k=1) == pytest.approx((1 / 3, 1.0))
    # k=2 real radii: 2, 1, 1, 2, 8 -> -1.5 (within 2 of 0.0) joins.
    assert precision_recall(real, fake, k=2) == pytest.approx((2 / 3, 1.0))


def test_precision_recall_on_gaussian_clouds():
    rng = np.random.default_rng(0)
    real = rng.standard_normal((600, 4))
    assert precision_recall(real, real, k=3) == (1.0, 1.0)
    assert precision_recall(real, real + 100.0, k=3) == (0.0, 0.0)
    # Half of the fakes come from the real distribution, half lie far away.
    fake = np.concatenate([rng.standard_normal((300, 4)), rng.standard_normal((300, 4)) + 100.0])
    precision, recall = precision_recall(real, fake, k=3)
    assert 0.4 < precision < 0.55 and recall > 0.6
    # Chunking changes memory use, not the answer.
    assert precision_recall(real, fake, k=3, chunk_size=37) == (precision, recall)
    with pytest.raises(ValueError):
        precision_recall(real, fake[:, :3])


# ---------------------------------------------------------------- error bars

def test_bootstrap_interval_of_normal_data():
    rng = np.random.default_rng(3)
    values = rng.normal(30.0, 2.0, size=400)  # e.g. PSNR in dB of 400 images
    ci = bootstrap_interval(values)
    assert ci.n == 400 and ci.confidence == 0.95 and ci.mean == pytest.approx(values.mean())
    assert ci.low < ci.mean < ci.high
    half_width = 1.96 * values.std(ddof=1) / np.sqrt(400)
    assert (ci.high - ci.low) / 2 == pytest.approx(half_width, rel=0.1)
    assert (ci.mean - ci.low) == pytest.approx(ci.high - ci.mean, rel=0.2)  # symmetric for normal data
    assert bootstrap_interval(values) == ci  # fixed seed
    assert bootstrap_interval(torch.from_numpy(values).float(), seed=1).low != ci.low
    wider = bootstrap_interval(values, confidence=0.99, resamples=2000)
    assert wider.low < ci.low and wider.high > ci.high


def test_bootstrap_interval_covers_the_true_mean():
    # 300 experiments of 60 exponential values (skewed like per-image errors); 95% intervals
    # should cover the true mean (1.0) in ~95% of them; the percentile bootstrap runs a little
    # low at this n, and 300 trials give a binomial sd of ~1.3%.
    rng = np.random.default_rng(4)
    covered = [ci.low <= 1.0 <= ci.high
               for ci in (bootstrap_interval(rng.exponential(1.0, 60), resamples=500, seed=i) for i in range(300))]
    assert 0.88 <= np.mean(covered) <= 0.99


def test_bootstrap_interval_rejects_bad_values():
    with pytest.raises(ValueError, match="cap it"):
        bootstrap_interval(np.array([30.0, np.inf, 31.0]))  # PSNR of an exact reconstruction
    with pytest.raises(ValueError, match="at least 2"):
        bootstrap_interval([1.0])


def test_paired_difference_on_students_sleep_data():
    # Cushny & Peebles' sleep data (Student 1908); R: t.test(extra ~ group, data = sleep, paired = TRUE)
    # prints mean difference -1.58, 95% CI -2.4598858 -0.7001142, t = -4.0621, df = 9, p = 0.002833.
    drug1 = [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0]
    drug2 = [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4]
    d = paired_difference(drug1, drug2)
    assert d.n == 10 and d.mean == pytest.approx(-1.58)
    assert (d.low, d.high) == pytest.approx((-2.4598858, -0.7001142), abs=1e-6)
    assert d.p_value == pytest.approx(0.002833, rel=1e-3)


def test_paired_difference_equals_the_t_formula():
    from scipy import stats

    rng = np.random.default_rng(5)
    shared = rng.normal(size=5)  # seed effect common to both configurations
    a, b = shared + rng.normal(0.3, 0.1, 5), shared + rng.normal(0.0, 0.1, 5)
    d = paired_difference(a, b, confidence=0.9)
    diff = a - b
    se = diff.std(ddof=1) / np.sqrt(5)
    t = stats.t.ppf(0.95, df=4)
    assert (d.low, d.high) == pytest.approx((diff.mean() - t * se, diff.mean() + t * se), rel=1e-9)
    assert d.p_value == pytest.approx(stats.ttest_rel(a, b).pvalue, rel=1e-9)
    assert d.p_value == pytest.approx(2 * stats.t.sf(abs(diff.mean() / se), df=4), rel=1e-9)
    # Unpaired, the shared seed effect hides the difference.
    assert stats.ttest_ind(a, b).pvalue > 10 * d.p_value
    with pytest.raises(ValueError, match="same seeds"):
        paired_difference(a, b[:4])
    # No spread: every seed improved by exactly 1.
    same = paired_difference([2.0, 3.0, 4.0], [1.0, 2.0, 3.0])
    assert (same.mean, same.low, same.high, same.p_value) == (1.0, 1.0, 1.0, 0.0)


# ---------------------------------------------------------------- CLIP score

@pytest.fixture
def tiny_clip(tmp_path):
    """A random CLIP with a byte-level BPE vocabulary of letters and digits, saved like a real checkpoint."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in string.ascii_lowercase + string.digits:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    tok_dir = tmp_path / "tokenizer"
    tok_dir.mkdir()
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    path = tmp_path / "clip"
    CLIPModel(config).save_pretrained(path)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


def test_clip_score_on_tiny_clip(tiny_clip):
    from transformers import CLIPModel, CLIPProcessor

    rng = np.random.default_rng(0)
    images = (rng.random((3, 40, 48, 3)) * 255).astype(np.uint8)
    captions = ["a cat", "a dog on the grass", "x" * 200]  # the last one needs truncation to 77 tokens
    score = clip_score(images, captions, tiny_clip, batch_size=2)

    # Independent computation through the projection heads.
    model = CLIPModel.from_pretrained(tiny_clip).eval()
    processor = CLIPProcessor.from_pretrained(tiny_clip)
    inputs = processor(text=captions, images=list(images), return_tensors="pt", padding=True,
                       truncation=True, max_length=77)
    with torch.no_grad():
        img = model.visual_projection(model.vision_model(pixel_values=inputs["pixel_values"]).pooler_output)
        txt = model.text_projection(model.text_model(input_ids=inputs["input_ids"],
                                                     attention_mask=inputs["attention_mask"]).pooler_output)
    cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
    assert score == pytest.approx((100 * cos.clamp(min=0)).mean().item(), abs=1e-3)

    # Float tensors in [0,1] are accepted and give the same score as the uint8 images.
    as_tensor = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    assert clip_score(as_tensor, captions, tiny_clip) == pytest.approx(score, abs=1e-4)
    with pytest.raises(ValueError, match="one caption per image"):
        clip_score(images, captions[:2], tiny_clip)
    with pytest.raises(FileNotFoundError, match="CLIP checkpoint"):
        clip_score(images, captions, tiny_clip / "missing")
