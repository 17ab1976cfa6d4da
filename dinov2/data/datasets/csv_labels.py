"""A CSV (or TSV) file with an image path column and one or more label columns.

Empty cells are missing labels (target -1). With one label column the target is an int and
``classes`` its class names; with several, the target is a dict ``{column: int}`` and ``tasks``
maps each column to its class names (``classes`` is then the first task's list). Class names are
the distinct values of a column, sorted numerically when they are all integers (so a column of
``0..K-1`` keeps its indices) and as text otherwise.
"""

from __future__ import annotations

import csv
import os

import numpy as np
from PIL import Image

from dinov2.data.datasets.base import (
    BAD_IMAGES_KEY,
    DatasetFormatError,
    LabelledImageDataset,
    open_text,
    resolve_inside,
)
from dinov2.data.image_io import load_image_file
from dinov2.data.spec import SpecKey, parse_bool, parse_list


def _sorted_classes(values: set[str]) -> list[str]:
    try:
        return sorted(values, key=int)
    except ValueError:
        return sorted(values)


class CSVDataset(LabelledImageDataset):
    SPEC_KEYS = {
        "path": SpecKey(str, help="the CSV/TSV file; its first line names the columns"),
        "root": SpecKey(str, "", "folder the image paths are relative to (default: the CSV's folder)"),
        "path_column": SpecKey(str, "", "column holding image paths (default: the first column)"),
        "label_columns": SpecKey(parse_list, None, "comma list of label columns (default: all other columns)"),
        "sep": SpecKey(str, "", "column separator (default: tab for .tsv files, comma otherwise)"),
        "check_files": SpecKey(parse_bool, True, "check on load that every image file exists"),
        **BAD_IMAGES_KEY,
    }

    def __init__(
        self,
        path: str,
        root: str = "",
        path_column: str = "",
        label_columns: list[str] | None = None,
        sep: str = "",
        check_files: bool = True,
        transform=None,
        target_transform=None,
        bad_images: str = "raise",
    ):
        super().__init__(transform, target_transform, bad_images)
        self.csv_path = path
        self.root = root or os.path.dirname(os.path.abspath(path))
        sep = sep or ("\t" if path.lower().endswith(".tsv") else ",")
        with open_text(path, "CSV file", newline="") as f:
            rows = list(csv.reader(f, delimiter=sep))
        if len(rows) < 2:
            raise DatasetFormatError(f"CSV file {path} needs a header line and at least one row")
        header = [h.strip() for h in rows[0]]
        path_column = path_column or header[0]
        label_columns = list(label_columns) if label_columns else [h for h in header if h != path_column]
        for column in [path_column, *label_columns]:
            if column not in header:
                raise DatasetFormatError(f"CSV file {path}: no column {column!r}; columns: {header}")
        if not label_columns:
            raise DatasetFormatError(f"CSV file {path}: no label column besides the path column {path_column!r}")
        path_at = header.index(path_column)
        label_at = [header.index(c) for c in label_columns]

        self._paths: list[str] = []
        cells: list[list[str]] = []
        for line, row in enumerate(rows[1:], start=2):
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise DatasetFormatError(f"CSV file {path}, line {line}: {len(row)} cells, header has {len(header)}")
            what = f"CSV file {path}, line {line}"
            full = resolve_inside(self.root, row[path_at].strip(), what)
            if check_files and not os.path.isfile(full):
                raise DatasetFormatError(f"{what}: image file {full} not found")
            self._paths.append(full)
            cells.append([row[i].strip() for i in label_at])

        self.tasks: dict[str, list[str]] = {}
        columns = []
        for t, column in enumerate(label_columns):
            values = [c[t] for c in cells]
            names = _sorted_classes({v for v in values if v})
            lookup = {name: i for i, name in enumerate(names)}
            self.tasks[column] = names
            columns.append([lookup[v] if v else -1 for v in values])
        self.task_names = list(label_columns)
        self._targets = np.asarray(columns, dtype=np.int64).T  # (N, tasks)
        self.classes = self.tasks[self.task_names[0]]

    @property
    def multi_task(self) -> bool:
        return len(self.task_names) > 1

    def __len__(self) -> int:
        return len(self._paths)

    def get_image_path(self, index: int) -> str:
        return self._paths[index]

    def load_image(self, index: int) -> Image.Image | None:
        return load_image_file(self._paths[index], self.bad_images)

    def get_target(self, index: int):
        if self.multi_task:
            return {task: int(v) for task, v in zip(self.task_names, self._targets[index])}
        return int(self._targets[index, 0])

    def get_targets(self) -> np.ndarray:
        """``(N,)`` for one label column, ``(N, tasks)`` in ``task_names`` order for several; -1 = missing."""
        return self._targets.copy() if self.multi_task else self._targets[:, 0].copy()
