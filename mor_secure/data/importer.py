"""Import a silo operator's own preference data (TRL-style JSONL) as `PreferencePair`s.

Why so strict: a silo trains a DP reward model on this data and the result
is hard to inspect afterwards, so a malformed row must stop the import with
a message the operator can act on, not be silently dropped. The import is
all-or-nothing, and every problem of the file is reported at once (up to a
cap) as "FILE:LINE: reason", so one pass fixes them all.

Row format, one JSON object per line (blank lines skipped):
    {"prompt": "...", "chosen": "...", "rejected": "...",
     "images": ["relative/path.png"], "kind": "color", "unit_id": "patient-0042"}
`kind` and `unit_id` are optional here; the silo's `data.unit` makes
`unit_id` required (patient) or refused (image). `unit_id` names the privacy
unit (a patient): with the default `privacy_unit: image`, all pairs of one
unit_id are one DP sample; rows without it are grouped by their image.

An image is known by its content (SHA-256 of the file), not its path: the
same picture under two paths is one image, so one unit. Every row of one
image must name the same unit_id, or none: a picture in two units (two
patients, or a patient and itself as an image) would count one person's data
twice while the DP guarantee is stated per unit.

Text must be what the models can take as written (text_rules.py): no lone
surrogate, no control character but tab and newlines, and no chat-template
marker in a prompt or answer. A field named twice in one row is refused, not
resolved: JSON readers disagree on which copy wins, so a swapped
chosen/rejected or a second unit_id would otherwise pass unseen.

A row that repeats an earlier one exactly (same image, prompt, chosen,
rejected and unit_id) is refused: it would silently weigh that pair twice in
training. The same question with chosen and rejected swapped is kept: that is
two annotators disagreeing, which the data may honestly hold.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import IO, Any, Literal

from PIL import Image

from mor_secure.data.records import QUESTION_KINDS, PreferencePair
from mor_secure.data.text_rules import model_text_problem, plain_text_problem

# Bounds on what one import may hold, so a wrong file (a binary dump, a
# whole dataset on one line) fails fast instead of exhausting memory.
MAX_LINE_BYTES = 1 << 20
MAX_ROWS = 1_000_000
# More problems than this are counted, not listed: the first ones show the pattern.
MAX_LISTED_PROBLEMS = 50

_TEXT_FIELDS = ("prompt", "chosen", "rejected")
_REQUIRED_FIELDS = (*_TEXT_FIELDS, "images")
_ALLOWED_FIELDS = frozenset((*_REQUIRED_FIELDS, "kind", "unit_id"))


@dataclass(frozen=True)
class RowProblem:
    """One reason a file cannot be imported; `line` is 1-based, 0 for the file as a whole."""

    path: Path
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}" if self.line else f"{self.path}: {self.reason}"


class DataImportError(ValueError):
    """The file was not imported; `problems` lists why (at most MAX_LISTED_PROBLEMS, `omitted` more)."""

    def __init__(self, path: Path, problems: list[RowProblem], omitted: int = 0) -> None:
        self.problems = problems
        self.omitted = omitted
        total = len(problems) + omitted
        lines = [f"{path}: {total} problem(s), nothing imported:", *(str(problem) for problem in problems)]
        if omitted:
            lines.append(f"... and {omitted} more")
        super().__init__("\n".join(lines))


class _RepeatedFields(Exception):
    """A JSON object names a field more than once; `fields` lists which."""

    def __init__(self, fields: list[str]) -> None:
        super().__init__(fields)
        self.fields = fields


def _object_without_repeats(items: list[tuple[str, Any]]) -> dict[str, Any]:
    """json.loads' object_pairs_hook: the object as a dict, or _RepeatedFields instead of last-wins."""
    names = [name for name, _ in items]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise _RepeatedFields(repeated)
    return dict(items)


class _ProblemList:
    """Collects problems, listing the first MAX_LISTED_PROBLEMS and counting the rest."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.listed: list[RowProblem] = []
        self.omitted = 0

    def add(self, line: int, reason: str) -> None:
        if len(self.listed) < MAX_LISTED_PROBLEMS:
            self.listed.append(RowProblem(self.path, line, reason))
        else:
            self.omitted += 1

    def raise_if_any(self) -> None:
        if self.listed:
            raise DataImportError(self.path, self.listed, self.omitted)


def import_preference_jsonl(jsonl_path: str | Path, image_root: str | Path, *,
                            unit: Literal["patient", "image"] | None = None) -> tuple[PreferencePair, ...]:
    """Every row of `jsonl_path` as a pair, images resolved under `image_root`; else DataImportError.

    `unit` is the privacy unit the operator declared (`data.unit`): "patient"
    refuses a row without a `unit_id` (its patient would be protected per
    image only), "image" a row with one; None takes each row as it comes.
    """
    jsonl_path = Path(jsonl_path)
    problems = _ProblemList(jsonl_path)
    root = Path(image_root).resolve()
    if not root.is_dir():
        problems.add(0, f"image root {image_root} is not a directory")
    if not jsonl_path.is_file():
        problems.add(0, "file not found")
    problems.raise_if_any()

    images = _ImageChecker(root)
    units = _UnitOfImage(root)
    repeats = _RepeatedPairs()
    pairs: list[PreferencePair] = []
    rows = 0
    with jsonl_path.open("rb") as handle:
        for line_number, raw in _numbered_lines(handle):
            if raw is None:
                problems.add(line_number, f"line longer than {MAX_LINE_BYTES} bytes")
                continue
            if not raw.strip():
                continue
            rows += 1
            if rows > MAX_ROWS:
                problems.add(line_number, f"more than {MAX_ROWS} rows; split the file")
                break
            pair, reasons = _parse_row(raw, images)
            if pair is not None:
                # A row refused for its unit_id does not hold its image to that unit: the next rows of the
                # image would each get a second error for the same mistake.
                reasons = (_declared_unit_problems(pair, unit) or units.check(pair, line_number)) \
                    + repeats.check(pair, line_number)
            for reason in reasons:
                problems.add(line_number, reason)
            if pair is not None and not reasons:
                pairs.append(pair)
    if rows == 0 and not problems.listed:
        problems.add(0, "no rows: the file is empty or blank")
    problems.raise_if_any()
    return tuple(pairs)


def _declared_unit_problems(pair: PreferencePair, unit: str | None) -> list[str]:
    if unit == "patient" and pair.unit_id is None:
        return ["no unit_id, but data.unit is patient: every row names its patient, or this row's patient would be "
                "protected per image only"]
    if unit == "image" and pair.unit_id is not None:
        return [f"unit_id {pair.unit_id!r}, but data.unit is image (the guarantee per image): remove unit_id, or "
                "set data.unit: patient"]
    return []


def _numbered_lines(handle: IO[bytes]) -> Iterator[tuple[int, bytes | None]]:
    """(1-based line number, line) pairs; None for a line over MAX_LINE_BYTES, which is skipped unread."""
    line_number = 0
    while chunk := handle.readline(MAX_LINE_BYTES + 1):
        line_number += 1
        if len(chunk) > MAX_LINE_BYTES and not chunk.endswith(b"\n"):
            # Consume the rest of the line in bounded chunks, never holding it whole.
            while (rest := handle.readline(MAX_LINE_BYTES)) and not rest.endswith(b"\n"):
                pass
            yield line_number, None
        else:
            yield line_number, chunk


def _parse_row(raw: bytes, images: _ImageChecker) -> tuple[PreferencePair | None, list[str]]:
    """The row's pair, or None and every reason it is invalid."""
    try:
        row = json.loads(raw.decode("utf-8"), object_pairs_hook=_object_without_repeats)
    except UnicodeDecodeError:
        return None, ["not valid UTF-8"]
    except _RepeatedFields as exc:
        return None, [f"field(s) {exc.fields} appear more than once; keep one of each"]
    except json.JSONDecodeError as exc:
        return None, [f"invalid JSON: {exc.msg} at column {exc.colno}"]
    # Valid JSON that json.loads still cannot read: the row's problem, not a crash of the whole import.
    except RecursionError:
        return None, ["arrays or objects nested too deeply to read; a row is one object of strings and a list"]
    except ValueError:  # after the two ValueErrors above, only an integer past Python's digit limit is left
        return None, [f"a number with more than {sys.get_int_max_str_digits()} digits; no field of a row is a number"]
    if not isinstance(row, dict):
        return None, [f"a row must be a JSON object, got {_json_type(row)}"]

    reasons: list[str] = []
    unknown = sorted(set(row) - _ALLOWED_FIELDS)
    if unknown:
        reasons.append(f"unknown field(s) {unknown}; allowed: {sorted(_ALLOWED_FIELDS)}")
    reasons += [f"missing field '{name}'" for name in _REQUIRED_FIELDS if name not in row]
    for name in _TEXT_FIELDS:
        if name in row:
            reasons += _text_problems(name, row[name], model_text_problem)
    chosen, rejected = row.get("chosen"), row.get("rejected")
    # Compared without surrounding spaces: "yes" against "yes " is the same answer.
    if isinstance(chosen, str) and isinstance(rejected, str) and chosen.strip() == rejected.strip() != "":
        reasons.append(f"chosen and rejected are the same answer ({chosen!r})")
    if "unit_id" in row:
        reasons += _text_problems("unit_id", row["unit_id"], plain_text_problem)
    kind = row.get("kind")
    if "kind" in row and kind not in QUESTION_KINDS:
        reasons.append(f"kind must be one of {list(QUESTION_KINDS)} or omitted, got {kind!r}")
    image = images.check(row["images"], reasons) if "images" in row else None

    if reasons or image is None:
        return None, reasons
    image_id, image_path = image
    unit_id = row.get("unit_id")
    pair = PreferencePair(
        image_id=image_id,
        image_path=image_path,
        prompt=row["prompt"],
        chosen=chosen,
        rejected=rejected,
        kind=kind,
        # Stripped: "patient-1 " and "patient-1" are one patient, so one unit.
        unit_id=unit_id.strip() if unit_id is not None else None,
    )
    return pair, []


def _text_problems(name: str, value: Any, content_problem: Callable[[str], str | None]) -> list[str]:
    if not isinstance(value, str):
        return [f"field '{name}' must be a string, got {_json_type(value)}"]
    if not value.strip():
        return [f"field '{name}' is empty"]
    problem = content_problem(value)
    return [f"field '{name}' {problem}"] if problem else []


class _UnitOfImage:
    """Holds each image to the unit_id its first row named (or to none): one picture, one privacy unit."""

    def __init__(self, root: Path) -> None:
        self._root = root
        self._first: dict[str, tuple[str | None, int, Path]] = {}  # image id -> (unit_id, line, path)

    def check(self, pair: PreferencePair, line: int) -> list[str]:
        unit, first_line, first_path = self._first.setdefault(pair.image_id, (pair.unit_id, line, pair.image_path))
        if unit == pair.unit_id:
            return []
        why = ("every row of one image must name the same unit_id, or none (one picture in two units counts its "
               "person twice)")
        if first_path == pair.image_path:
            return [f"unit_id {_named(pair.unit_id)} differs from line {first_line}'s {_named(unit)} for this "
                    f"image: {why}"]
        # Another file with the same bytes: name both, relative to the image root (as resolved there).
        return [f"{pair.image_path.relative_to(self._root)} (line {line}) has the same content as "
                f"{first_path.relative_to(self._root)} (line {first_line}), which line {first_line} gives to "
                f"{_given(unit)} and this row to {_given(pair.unit_id)}: {why}"]


class _RepeatedPairs:
    """Refuses a row that repeats an earlier one exactly: the pair would weigh twice in training."""

    def __init__(self) -> None:
        self._first: dict[tuple[str, str, str, str, str | None], int] = {}  # the pair's fields -> its first line

    def check(self, pair: PreferencePair, line: int) -> list[str]:
        fields = (pair.image_id, pair.prompt, pair.chosen, pair.rejected, pair.unit_id)
        first_line = self._first.setdefault(fields, line)
        if first_line == line:
            return []
        return [f"repeats line {first_line} (same image, prompt, chosen, rejected and unit_id): the pair would "
                "weigh twice in training; remove one"]


def _named(unit_id: str | None) -> str:
    return "(none)" if unit_id is None else repr(unit_id)


def _given(unit_id: str | None) -> str:
    return "no unit_id" if unit_id is None else f"unit_id {unit_id!r}"


class _ImageChecker:
    """Resolves row image paths safely under the root; reads each distinct file once."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._ids: dict[Path, str] = {}  # a readable image's path -> its image id (from its content)
        self._problems: dict[Path, str] = {}  # any other path -> why it is not an image

    def check(self, images: Any, reasons: list[str]) -> tuple[str, Path] | None:
        """(image_id, absolute path) of the row's single image, or None with reasons appended."""
        if not (isinstance(images, list) and len(images) == 1 and isinstance(images[0], str) and images[0]):
            reasons.append(f"field 'images' must be a list holding one non-empty path string, got {images!r:.80}")
            return None
        relative = images[0]
        # A NUL or a lone surrogate cannot reach the OS (pathlib raises ValueError on them).
        problem = plain_text_problem(relative)
        if problem:
            reasons.append(f"image path {relative!r} {problem}")
            return None
        # Reject both POSIX and Windows absolute forms: the file must work on every silo host.
        if PurePosixPath(relative).is_absolute() or PureWindowsPath(relative).is_absolute():
            reasons.append(f"image path {relative!r} must be relative to the image root")
            return None
        # resolve() also follows symlinks, so a link pointing outside the root is caught too.
        try:
            resolved = (self.root / relative).resolve()
        except RuntimeError:  # how Python 3.11's non-strict resolve() reports a symlink loop
            reasons.append(f"image path {relative!r} is a symlink loop; point the link at a file")
            return None
        if not resolved.is_relative_to(self.root):
            reasons.append(f"image path {relative!r} escapes the image root {self.root}")
            return None
        if resolved not in self._problems and resolved not in self._ids:
            problem, digest = _read_image(resolved)
            if problem is None:
                self._ids[resolved] = f"import:sha256:{digest}"
            else:
                self._problems[resolved] = problem
        if resolved in self._problems:
            reasons.append(f"image {relative!r}: {self._problems[resolved]}")
            return None
        return self._ids[resolved], resolved


def _read_image(path: Path) -> tuple[str | None, str]:
    """(why `path` is not a whole image PIL can decode, or None; the SHA-256 of its bytes)."""
    try:
        if not path.is_file():
            return f"file not found ({path})", ""
    except OSError as exc:  # is_file() answers False only for a missing file; a name too long raises
        return f"cannot be opened ({exc.strerror}); shorten or fix the path", ""
    try:
        with Image.open(path) as image:
            image.verify()  # the container: chunk checksums, headers
        # verify() does not decode: a truncated JPEG, BMP or GIF passes it and fails only in training.
        with Image.open(path) as image:
            image.load()
    # PIL signals corrupt or unsupported files with many exception types
    # (OSError, SyntaxError, ValueError, DecompressionBombError, ...).
    except Exception as exc:  # noqa: BLE001
        return f"not an image PIL can read ({type(exc).__name__}: {exc})", ""
    with path.open("rb") as handle:
        return None, hashlib.file_digest(handle, "sha256").hexdigest()


def _json_type(value: Any) -> str:
    """The JSON name of a decoded value's type, as the user wrote it in the file."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)
