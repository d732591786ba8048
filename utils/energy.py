"""The energy score and the energy-bounded outlier-exposure regulariser of Liu et al., "Energy-based
Out-of-distribution Detection", NeurIPS 2020.

Sign convention (the paper's): the energy is *lower* for in-distribution inputs, so ``-energy`` is the
detection score that is higher for in-distribution.
"""
import torch
import torch.nn.functional as F


def energy_score(logits: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """The free energy of each row of ``logits`` (shape ``[N, K]``) at temperature ``T``::

        E(x; f, T) = -T · log Σ_k exp(f_k(x) / T)

    Returns shape ``[N]``.
    """
    return -T * torch.logsumexp(logits / T, dim=1)


def energy_regularizer(energy_in: torch.Tensor, energy_out: torch.Tensor, m_in: float, m_out: float) -> torch.Tensor:
    """The squared-hinge energy loss that fine-tunes a classifier with auxiliary outliers::

        L_energy = mean_in( relu(E(x_in) - m_in)² ) + mean_out( relu(m_out - E(x_out))² )

    It pushes in-distribution energies below ``m_in`` and outlier energies above ``m_out``
    (the energy-bounded learning objective of Liu et al.; energy_ood's CIFAR defaults are m_in = -25, m_out = -7).
    The training loss is cross-entropy + λ · L_energy.
    """
    return F.relu(energy_in - m_in).pow(2).mean() + F.relu(m_out - energy_out).pow(2).mean()
