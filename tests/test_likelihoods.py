import numpy as np
import torch
from scipy import stats

from vae_models.likelihoods import (
    bounded_logvar,
    categorical_log_prob,
    gaussian_log_prob,
    kl_to_standard_normal,
)


def test_gaussian_matches_scipy():
    x, mu, logvar = (
        torch.tensor([0.3, -2.0, 5.0]),
        torch.tensor([0.0, 1.0, 4.0]),
        torch.tensor([0.0, 1.0, -2.0]),
    )
    expected = stats.norm.logpdf(x.numpy(), mu.numpy(), np.exp(0.5 * logvar.numpy()))
    np.testing.assert_allclose(gaussian_log_prob(x, mu, logvar).numpy(), expected, rtol=1e-5)


def test_categorical_matches_scipy_multinomial():
    logits = torch.tensor([[1.0, 2.0, 0.5], [0.0, 0.0, 3.0]])
    codes = torch.tensor([1, 2])
    p = torch.softmax(logits, -1).numpy()
    expected = [stats.multinomial.logpmf(np.eye(3)[c], 1, p[i]) for i, c in enumerate(codes.numpy())]
    np.testing.assert_allclose(categorical_log_prob(codes, logits).numpy(), expected, rtol=1e-5)


def test_categorical_broadcasts_over_samples():
    logits = torch.randn(5, 2, 4)  # (K, B, C)
    codes = torch.tensor([3, 0])
    out = categorical_log_prob(codes, logits)
    assert out.shape == (5, 2)
    assert torch.allclose(out[2, 1], torch.log_softmax(logits[2, 1], -1)[0])


def test_kl_matches_scipy_entropy_formula():
    mu, logvar = torch.tensor([[0.5, -1.0]]), torch.tensor([[0.2, -0.7]])
    var = np.exp(logvar.numpy())
    expected = 0.5 * np.sum(mu.numpy() ** 2 + var - 1 - logvar.numpy())
    np.testing.assert_allclose(kl_to_standard_normal(mu, logvar).numpy(), [expected], rtol=1e-6)


def test_logvar_is_bounded():
    out = bounded_logvar(torch.tensor([-1e6, 0.0, 1e6]), -8.0, 6.0)
    assert out.min() >= -8.0 and out.max() <= 6.0
