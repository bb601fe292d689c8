"""The data and model both digits examples train: scikit-learn's digits and a small MLP."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["Data", "accuracy", "load_data", "make_model"]


@dataclass
class Data:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_data(seed: int = 0) -> Data:
    """Digits (8x8, 1797 images, bundled: no download) scaled to [0, 1]; a stratified 75/25
    split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, stratify=y, random_state=seed)
    return Data(torch.from_numpy(xtr), torch.from_numpy(ytr), torch.from_numpy(xte),
                torch.from_numpy(yte))


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(),
                               torch.nn.Linear(32, 10))


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (model(x).argmax(1) == y).float().mean().item()
