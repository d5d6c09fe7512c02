"""CSVWriter: the scalars of a run as one CSV table, a row per written iteration and a column per name.

Re-exported from :mod:`trainkit.utils.events` (its own module only because events.py is long already).
"""
import csv
import io
import logging
import os
from typing import Any, Dict, List, Optional

from trainkit.utils.events import EventWriter, _keep_old_file, _new_scalars_by_iter, get_event_storage

__all__ = ["CSVWriter"]

logger = logging.getLogger(__name__)


class CSVWriter(EventWriter):
    """Appends one row per iteration to ``csv_file``: an ``iteration`` column, then one column per scalar name
    (sorted). Cells of names that were not put at an iteration are empty. Read it with ``csv.DictReader``.

    A CSV header cannot grow in place. When a name appears that the header lacks (an evaluation metric at
    the first evaluation), the file is written again once with the wider header: to a temporary file that
    is fsynced and renamed over the old one, so a kill at any moment leaves the old or the new table. Names
    appear a handful of times per run, so this stays rare; every other write is an append. (A sidecar file
    of column names would avoid the rewrite but leave a CSV that no reader understands on its own.)

    Like :class:`~trainkit.utils.events.JSONWriter`: each write is one ``write()`` of whole rows and a flush,
    so a killed process leaves whole rows; a resumed run drops the rows after the last write before its
    checkpoint (and a row cut short), then appends, so no iteration appears twice; a run starting at
    iteration 0 over a non-empty file moves the old one to ``<csv_file>.<n>.bak``.

    Args:
        csv_file: path of the file.
        window_size: window of the median for metrics with a smoothing hint.
    """

    def __init__(self, csv_file: str, window_size: int = 20) -> None:
        self._path = csv_file
        self._window_size = window_size
        self._file_handle: Optional[Any] = None
        self._columns: List[str] = []  # the header, "iteration" first
        self._last_write = -1

    def _open(self, start_iter: int) -> None:
        kept = self._kept_through(start_iter)
        self._columns = []
        if os.path.exists(self._path) and os.path.getsize(self._path) > 0:
            if start_iter > 0:
                self._keep_rows_through(kept)
            else:
                _keep_old_file(self._path)
        self._file_handle = open(self._path, "a", newline="")
        self._last_write = kept
        self._continue_after = None

    def _keep_rows_through(self, kept: int) -> None:
        with open(self._path, newline="") as f:
            text = f.read()
        # A last line without its newline was cut short by a kill: csv would read it as a shorter row.
        complete = text[: text.rfind("\n") + 1]
        reader = csv.DictReader(io.StringIO(complete))
        self._columns = list(reader.fieldnames or [])
        rows = [r for r in reader if _iteration(r) is not None and _iteration(r) <= kept]
        if complete != text or len(rows) != complete.count("\n") - 1:
            logger.info("%s: keeping the %d rows through iteration %d (the resumed run writes the rest again).",
                        self._path, len(rows), kept)
            self._rewrite(rows)

    def _rewrite(self, rows: List[Dict[str, Any]]) -> None:
        # The whole table with the current header, atomically: a kill leaves the old file or the new one.
        tmp = f"{self._path}.tmp"
        with open(tmp, "w", newline="") as f:
            f.write(self._format(rows, header=True))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._path)

    def _format(self, rows: List[Dict[str, Any]], header: bool = False) -> str:
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=self._columns, lineterminator="\n")
        if header:
            writer.writeheader()
        writer.writerows(rows)
        return out.getvalue()

    def _widen(self, names: List[str]) -> None:
        # New names: rewrite the file once with the wider header (the rows read back with empty new cells).
        if self._file_handle is not None:
            self._file_handle.close()
        rows: List[Dict[str, Any]] = []
        if self._columns:
            with open(self._path, newline="") as f:
                rows = list(csv.DictReader(f))
        self._columns = ["iteration"] + sorted(set(self._columns[1:]) | set(names))
        self._rewrite(rows)
        self._file_handle = open(self._path, "a", newline="")

    def write(self) -> None:
        storage = get_event_storage()
        if self._file_handle is None:
            self._open(storage.start_iter)
        new = _new_scalars_by_iter(storage, self._window_size, self._last_write)
        if not new:
            return
        names = {name for scalars in new.values() for name in scalars}
        if not self._columns or not names.issubset(self._columns):
            self._widen(sorted(names))
        rows = [{**scalars, "iteration": itr} for itr, scalars in new.items()]
        self._file_handle.write(self._format(rows))
        self._file_handle.flush()
        self._last_write = max(new)

    def close(self) -> None:
        # A later write (a second train() with the same writers) opens the file again.
        if self._file_handle is not None:
            self._file_handle.close()
            self._file_handle = None


def _iteration(row: Dict[str, Any]) -> Optional[int]:
    try:
        return int(row["iteration"])
    except (KeyError, TypeError, ValueError):
        return None
