"""``polytropon merge``: one task of a saved run merged into a plain transformers model, equal to the routed task."""

from __future__ import annotations

import os


def test_merge_reproduces_the_routed_task(trained_run, tiny_bert, capsys, tmp_path, routed_logits, run_cli):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    batch = tok(["the big red cat runs", "the small blue dog sleeps"], return_tensors="pt", padding=True)
    expected = routed_logits(trained_run, tiny_bert, batch, task=1)

    merged_dir = str(tmp_path / "merged")
    code, out, err = run_cli(capsys, "merge", trained_run, "--task", "1", "--output", merged_dir)
    assert code == 0, err
    plain = AutoModelForSequenceClassification.from_pretrained(merged_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, expected, rtol=1e-5, atol=1e-5)


def test_merge_rejects_bad_input(trained_run, capsys, tmp_path, assert_one_line_error, run_cli):
    out_dir = str(tmp_path / "out")
    code, _, err = run_cli(capsys, "merge", trained_run, "--task", "zebra", "--output", out_dir)
    assert_one_line_error(code, err, "unknown task 'zebra'", "animal, color")
    code, _, err = run_cli(capsys, "merge", trained_run, "--task", "7", "--output", out_dir)
    assert_one_line_error(code, err, "task id 7 is out of range")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    code, _, err = run_cli(capsys, "merge", trained_run, "--task", "animal", "--output", str(occupied))
    assert_one_line_error(code, err, "refusing to overwrite")
    assert (occupied / "keep.txt").read_text() == "mine"
    assert not os.path.exists(out_dir)
