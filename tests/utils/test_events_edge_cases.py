"""Edge cases of the writers: a writer used for a second run after it was closed (``trainer.train()`` called
again on the same trainer, whose PeriodicWriter closed the writers at the end of the first run)."""
import json

from trainkit.utils.events import EventStorage, JSONWriter


def run(writer, start_iter, losses):
    # One "run": a storage from start_iter, one raw loss per iteration, a write after each, then close.
    with EventStorage(start_iter) as storage:
        for offset, loss in enumerate(losses):
            storage.iter = start_iter + offset
            storage.put_scalar("loss", loss, smoothing_hint=False)
            writer.write()
        writer.close()


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_json_writer_closed_after_one_run_continues_the_file_in_the_next_run(tmp_path):
    path = tmp_path / "metrics.json"
    writer = JSONWriter(str(path))
    run(writer, 0, [1.0, 0.5])
    run(writer, 2, [0.25])
    assert lines(path) == [{"iteration": 0, "loss": 1.0}, {"iteration": 1, "loss": 0.5}, {"iteration": 2, "loss": 0.25}]
    assert writer._file_handle is None  # closed again at the end of the second run


def test_json_writer_closed_after_one_run_starts_afresh_when_the_next_run_starts_at_0(tmp_path):
    # The same as a new writer would do: the old file becomes metrics.json.1.bak, every line is written again.
    path = tmp_path / "metrics.json"
    writer = JSONWriter(str(path))
    run(writer, 0, [1.0, 0.5])
    run(writer, 0, [2.0, 1.5])
    assert lines(path) == [{"iteration": 0, "loss": 2.0}, {"iteration": 1, "loss": 1.5}]
    assert lines(tmp_path / "metrics.json.1.bak") == [{"iteration": 0, "loss": 1.0}, {"iteration": 1, "loss": 0.5}]
