"""The application's routing plot (``polytropon.app.plots``)."""

from __future__ import annotations

import os

import pytest


def test_routing_plot_with_reference_panel(tmp_path):
    import numpy as np

    from polytropon.app.plots import plot_routing_matrix

    m = np.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]])
    path = plot_routing_matrix(m, ["x", "y", "z"], tmp_path / "p.png", reference=np.eye(3)[:, :2], reference_names=["u", "v"])
    assert os.path.getsize(path) > 1000
    with pytest.raises(ValueError):
        plot_routing_matrix(m, ["x", "y"], tmp_path / "q.png")
    with pytest.raises(ValueError):
        plot_routing_matrix(m, ["x", "y", "z"], tmp_path / "r.png", reference=np.eye(2))

