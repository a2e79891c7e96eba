"""The real-data training check (``python -m resfuse.train``), short version: ResNet-20 on sklearn's digits,
fused against plain PyTorch from the same weights on the same batches."""
import pytest

from resfuse import train

pytest.importorskip("sklearn")


def test_quick_training_check():
    report = train.run_check("resnet20", steps=train.QUICK_STEPS, batch=train.QUICK_BATCH)
    assert not report.failures(), "\n".join(report.failures()) + "\n" + train.table([report])
    assert len(report.fused.losses) == train.QUICK_STEPS and len(report.floor.losses) == train.MATCH_STEPS


def test_cli_writes_table_and_png(tmp_path, capsys, monkeypatch):
    calls = []

    def fake_run_check(model, steps, batch, size, lr, width, seed, progress):
        calls.append((model, steps, batch, size, progress))
        losses = [2.0 / (i + 1) for i in range(steps)]
        run = train.Run(losses, 0.97, 1.0)
        return train.Report(model, steps, run, run._replace(losses=[v * (1 + 1e-7) for v in losses]),
                            run._replace(losses=[v * (1 + 1e-6) for v in losses[:train.MATCH_STEPS]]))

    monkeypatch.setattr(train, "run_check", fake_run_check)
    png = tmp_path / "curves.png"
    assert train.main(["--quick", "--png", str(png)]) == 0
    assert calls == [("resnet20", train.QUICK_STEPS, train.QUICK_BATCH, 16, True)]
    out = capsys.readouterr().out
    assert "rel diff 50 steps" in out and "OK:" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit):
        train.main(["--steps", "10"])
