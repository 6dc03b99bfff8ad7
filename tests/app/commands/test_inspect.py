"""``polytropon inspect`` of a saved run: its configuration, tasks, sizes and routing plot."""

from __future__ import annotations

import os


def test_inspect_saved_run(trained_run, capsys, tmp_path, run_cli):
    plot = str(tmp_path / "r.png")
    code, out, err = run_cli(capsys, "inspect", trained_run, "--plot", plot)
    assert code == 0, err
    assert "n_tasks: 2" in out and "n_skills: 2" in out
    assert "tasks (2): animal, color" in out
    assert "adapted layers: 4" in out and "router: 16" in out  # (2 layers x query, value) x 2 tasks x 2 skills
    assert os.path.getsize(plot) > 1000

