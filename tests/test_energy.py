"""The energy score and the energy regulariser against hand computations (Liu et al., NeurIPS 2020)."""
import math

import pytest
import torch

from utils.energy import energy_regularizer, energy_score

LOGITS = [[1.0, 2.0, 3.0], [-4.0, 0.5, 10.0]]


def hand_energy(row: list[float], T: float) -> float:
    return -T * math.log(sum(math.exp(v / T) for v in row))


@pytest.mark.parametrize("T", [1.0, 2.5, 0.5])
def test_energy_score_is_minus_T_logsumexp(T):
    energies = energy_score(torch.tensor(LOGITS, dtype=torch.float64), T)
    assert energies.shape == (2,)
    assert energies.tolist() == pytest.approx([hand_energy(row, T) for row in LOGITS], rel=1e-12)


def test_energy_score_is_stable_for_large_logits():
    # exp(1000) overflows; the energy of [1000, 1000] is -1000 - log 2.
    energy = energy_score(torch.tensor([[1000.0, 1000.0]]))
    assert energy.item() == pytest.approx(-1000 - math.log(2), rel=1e-6)


def test_lower_energy_means_more_confident():
    confident, uncertain = energy_score(torch.tensor([[20.0, 0.0, 0.0], [1.0, 1.0, 1.0]]))
    assert confident < uncertain


def test_energy_regularizer_matches_hand_computation():
    energy_in = [-30.0, -24.0, -20.0]  # hinge relu(E - m_in) with m_in = -25: 0, 1, 5
    energy_out = [-10.0, -7.5, -2.0, -8.0]  # hinge relu(m_out - E) with m_out = -7: 3, 0.5, 0, 1
    expected = (0 + 1 + 25) / 3 + (9 + 0.25 + 0 + 1) / 4
    value = energy_regularizer(torch.tensor(energy_in), torch.tensor(energy_out), m_in=-25.0, m_out=-7.0)
    assert value.item() == pytest.approx(expected, rel=1e-6)


def test_energy_regularizer_is_zero_inside_the_margins():
    value = energy_regularizer(torch.tensor([-40.0, -26.0]), torch.tensor([0.0, -6.0]), m_in=-25.0, m_out=-7.0)
    assert value.item() == 0.0


def test_energy_regularizer_gradient_pushes_energies_past_the_margins():
    energy_in = torch.tensor([-20.0], requires_grad=True)
    energy_out = torch.tensor([-10.0], requires_grad=True)
    energy_regularizer(energy_in, energy_out, m_in=-25.0, m_out=-7.0).backward()
    # d/dE (E - m_in)^2 = 2 (E - m_in) = 10 > 0: descent lowers E_in; d/dE (m_out - E)^2 = -2 (m_out - E) = -6 < 0.
    assert energy_in.grad.item() == pytest.approx(10.0)
    assert energy_out.grad.item() == pytest.approx(-6.0)
