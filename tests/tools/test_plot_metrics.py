import json
import runpy
from pathlib import Path

import matplotlib.image
import pytest

TOOL = Path(__file__).resolve().parents[2] / "tools" / "plot_metrics.py"
plot_metrics = runpy.run_path(str(TOOL))  # the tool's functions, without running main


def write_run(folder, losses, top1_at_end):
    folder.mkdir()
    lines = [{"iteration": 20 * i + 19, "total_loss": loss, "lr": 0.1} for i, loss in enumerate(losses)]
    lines[-1]["classification/top1"] = top1_at_end
    text = "".join(json.dumps(m) + "\n" for m in lines) + '{"iteration": 99, "total_lo'  # a cut-off line
    (folder / "metrics.json").write_text(text)


def test_plots_every_default_metric_of_two_runs_into_a_png(tmp_path, capsys):
    write_run(tmp_path / "a", [2.0, 1.0, 0.5], 90.0)
    write_run(tmp_path / "b", [2.0, 0.8, 0.4], 92.0)
    out = tmp_path / "m.png"
    assert plot_metrics["main"]([str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(out)]) == 0
    assert "3 panels, 2 run(s)" in capsys.readouterr().out
    image = matplotlib.image.imread(str(out))
    assert image.shape[0] == 3 * 260 and image.shape[1] == 800  # 2.6 in per panel, 8 in wide, 100 dpi


def test_reads_series_and_skips_broken_lines(tmp_path):
    write_run(tmp_path / "a", [2.0, 1.0, 0.5], 90.0)
    lines = plot_metrics["read_metrics"](str(tmp_path / "a"))
    assert plot_metrics["series"](lines, "total_loss") == ([19, 39, 59], [2.0, 1.0, 0.5])
    assert plot_metrics["default_keys"](lines) == ["total_loss", "lr", "classification/top1"]


def test_unknown_metric_and_missing_run_are_named(tmp_path, capsys):
    write_run(tmp_path / "a", [2.0], 90.0)
    assert plot_metrics["main"]([str(tmp_path / "a"), "-k", "top1"]) == 2
    err = capsys.readouterr().err
    assert "no run has ['top1']" in err and "classification/top1" in err
    with pytest.raises(FileNotFoundError, match="nowhere"):
        plot_metrics["main"]([str(tmp_path / "nowhere")])


def test_the_png_goes_into_the_first_run_folder_by_default(tmp_path, capsys, monkeypatch):
    write_run(tmp_path / "a", [2.0, 1.0], 90.0)
    write_run(tmp_path / "b", [2.0, 0.8], 92.0)
    monkeypatch.chdir(tmp_path)
    assert plot_metrics["main"](["a", str(tmp_path / "b" / "metrics.json")]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {Path('a') / 'metrics.png'} (3 panels, 2 run(s))")
    assert matplotlib.image.imread(str(tmp_path / "a" / "metrics.png")).shape[:2] == (3 * 260, 800)
    assert not (tmp_path / "metrics.png").exists() and not (tmp_path / "b" / "metrics.png").exists()
    assert plot_metrics["main"]([str(tmp_path / "b" / "metrics.json")]) == 0  # a metrics.json: beside it
    assert (tmp_path / "b" / "metrics.png").exists()
