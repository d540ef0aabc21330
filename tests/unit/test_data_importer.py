"""Importing users' JSONL preferences: all rows or nothing, every problem with its line."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from mor_secure.data import DataImportError, PreferencePair, import_preference_jsonl
from mor_secure.data import importer
from mor_secure.data.records import privacy_unit_of

PROMPT = "what color is the shape?"


def _png(path: Path, color: tuple[int, int, int] = (200, 30, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), color).save(path)


def _id(path: Path) -> str:
    return "import:sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def _row(image: str = "img/a.png", **overrides: object) -> str:
    row = {"prompt": PROMPT, "chosen": "red", "rejected": "blue", "images": [image]}
    row.update(overrides)
    return json.dumps(row)


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def image_root(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    _png(root / "img" / "a.png")
    _png(root / "img" / "b.png", (30, 30, 200))
    return root


def test_a_good_file_imports_every_row(tmp_path: Path, image_root: Path) -> None:
    jsonl = _write(
        tmp_path / "prefs.jsonl",
        [_row(), "", _row("img/b.png", kind="color"), _row("img/../img/a.png", chosen="yes", rejected="no")],
    )
    pairs = import_preference_jsonl(jsonl, image_root)
    a_png, b_png = (image_root / "img/a.png").resolve(), (image_root / "img/b.png").resolve()
    assert pairs == (
        PreferencePair(_id(a_png), a_png, PROMPT, "red", "blue"),
        PreferencePair(_id(b_png), b_png, PROMPT, "red", "blue", "color"),
        # "img/../img/a.png" is normalised, so the same file gets the same image id.
        PreferencePair(_id(a_png), a_png, PROMPT, "yes", "no"),
    )


def test_one_picture_is_one_privacy_unit_whatever_its_path_or_spelling(tmp_path: Path, image_root: Path) -> None:
    """A copy of a.png under another path is the same image; a unit_id's spaces do not make a second patient."""
    (image_root / "copy").mkdir()
    (image_root / "copy" / "a-again.png").write_bytes((image_root / "img/a.png").read_bytes())
    like_an_image_id = "import:sha256:" + "0" * 64
    jsonl = _write(tmp_path / "prefs.jsonl", [_row(unit_id="patient-1"),
                                              _row("copy/a-again.png", unit_id=" patient-1 ", rejected="green"),
                                              _row("img/b.png", unit_id=like_an_image_id)])
    pairs = import_preference_jsonl(jsonl, image_root)
    assert pairs[0].image_id == pairs[1].image_id and pairs[1].unit_id == "patient-1"
    assert len({privacy_unit_of(p) for p in pairs[:2]}) == 1
    # A unit_id spelled like an image id stays a unit of its own, apart from any image's.
    assert privacy_unit_of(pairs[2]) != _id(image_root / "img/b.png") and privacy_unit_of(pairs[2]).startswith("unit:")


@pytest.mark.parametrize(("second", "says"), [
    (_row(), "unit_id (none) differs from line 1's 'patient-1' for this image"),
    (_row(unit_id="patient-2"), "unit_id 'patient-2' differs from line 1's 'patient-1' for this image"),
    (_row("copy/a-again.png"), "copy/a-again.png (line 3) has the same content as img/a.png (line 1), which line 1 "
                               "gives to unit_id 'patient-1' and this row to no unit_id"),
    (_row("copy/a-again.png", unit_id="patient-2"), "copy/a-again.png (line 3) has the same content as img/a.png "
                                                    "(line 1), which line 1 gives to unit_id 'patient-1' and this row "
                                                    "to unit_id 'patient-2'"),
], ids=["no-unit", "another-unit", "a-copy-with-no-unit", "a-copy-in-another-unit"])
def test_an_image_in_two_privacy_units_is_refused(tmp_path: Path, image_root: Path, second: str, says: str) -> None:
    """One picture in two units would count its patient twice under a per-unit guarantee."""
    (image_root / "copy").mkdir()
    (image_root / "copy" / "a-again.png").write_bytes((image_root / "img/a.png").read_bytes())
    jsonl = _write(tmp_path / "prefs.jsonl", [_row(unit_id="patient-1"), _row("img/b.png"), second])
    with pytest.raises(DataImportError) as caught:
        import_preference_jsonl(jsonl, image_root)
    assert [(p.line, p.reason.split(":")[0]) for p in caught.value.problems] == [(3, says)]


@pytest.mark.parametrize("image_format", ["JPEG", "BMP", "GIF", "PNG"])
def test_a_truncated_image_is_refused_at_import(tmp_path: Path, image_root: Path, image_format: str) -> None:
    """Image.verify() alone passes a cut-off JPEG, BMP or GIF; the import must decode it."""
    encoded = io.BytesIO()
    Image.effect_noise((64, 64), 60).convert("RGB" if image_format != "GIF" else "L").save(encoded, image_format)
    (image_root / "cut.img").write_bytes(encoded.getvalue()[: len(encoded.getvalue()) * 2 // 3])
    jsonl = _write(tmp_path / "prefs.jsonl", [_row(), _row("cut.img")])
    with pytest.raises(DataImportError) as caught:
        import_preference_jsonl(jsonl, image_root)
    assert [p.line for p in caught.value.problems] == [2]
    assert "not an image PIL can read" in caught.value.problems[0].reason


def test_every_bad_row_is_reported_with_its_line_and_nothing_is_imported(tmp_path: Path, image_root: Path) -> None:
    (tmp_path / "outside.png").write_bytes((image_root / "img/a.png").read_bytes())
    jsonl = _write(
        tmp_path / "prefs.jsonl",
        [
            _row(),                                     # 1 good
            '{"prompt": "broken", ',                    # 2 bad JSON
            json.dumps({"prompt": "p", "chosen": "a", "images": ["img/a.png"]}),  # 3 missing rejected
            _row("img/b.png"),                          # 4 good
            _row(chosen="red", rejected="red"),         # 5 chosen == rejected
            _row("img/missing.png"),                    # 6 missing image
            _row("../outside.png"),                     # 7 escapes the root
        ],
    )
    with pytest.raises(DataImportError) as caught:
        import_preference_jsonl(jsonl, image_root)
    problems = caught.value.problems
    assert [p.line for p in problems] == [2, 3, 5, 6, 7]
    reasons = {p.line: p.reason for p in problems}
    assert reasons[2].startswith("invalid JSON")
    assert reasons[3] == "missing field 'rejected'"
    assert reasons[5] == "chosen and rejected are the same answer ('red')"
    assert "file not found" in reasons[6]
    assert "escapes the image root" in reasons[7]
    message_lines = str(caught.value).splitlines()
    assert f"{jsonl}:5: chosen and rejected are the same answer ('red')" in message_lines
    assert all(p.path == jsonl for p in problems)


@pytest.mark.parametrize(
    ("line", "expected_reason"),
    [
        ("[1, 2]", "a row must be a JSON object, got array"),
        (_row(score=1), "unknown field(s) ['score']"),
        (_row(prompt=3), "field 'prompt' must be a string, got number"),
        (_row(chosen="  "), "field 'chosen' is empty"),
        (_row(kind="texture"), "kind must be one of"),
        (_row(images=["img/a.png", "img/b.png"]), "field 'images' must be a list holding one"),
        (_row("/etc/passwd"), "must be relative to the image root"),
        (_row("img/not-an-image.png"), "not an image PIL can read"),
    ],
)
def test_each_kind_of_bad_row_is_named(tmp_path: Path, image_root: Path, line: str, expected_reason: str) -> None:
    (image_root / "img" / "not-an-image.png").write_text("hello")
    jsonl = _write(tmp_path / "prefs.jsonl", [_row(), line])
    with pytest.raises(DataImportError) as caught:
        import_preference_jsonl(jsonl, image_root)
    assert len(caught.value.problems) == 1
    assert caught.value.problems[0].line == 2
    assert expected_reason in caught.value.problems[0].reason


def test_long_lines_row_limit_and_problem_cap(
    tmp_path: Path, image_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(importer, "MAX_LINE_BYTES", 64)
    jsonl = _write(tmp_path / "long.jsonl", ["x" * 200, '{"a": 1}'])
    with pytest.raises(DataImportError) as caught:
        import_preference_jsonl(jsonl, image_root)
    assert [(p.line, p.reason) for p in caught.value.problems][0] == (1, "line longer than 64 bytes")
    assert caught.value.problems[1].line == 2
    monkeypatch.undo()

    monkeypatch.setattr(importer, "MAX_ROWS", 3)
    jsonl = _write(tmp_path / "many.jsonl", [_row()] * 5)
    with pytest.raises(DataImportError, match=r"many.jsonl:4: more than 3 rows"):
        import_preference_jsonl(jsonl, image_root)
    monkeypatch.undo()

    jsonl = _write(tmp_path / "bad.jsonl", ["nope"] * 60)
    with pytest.raises(DataImportError) as caught:
        import_preference_jsonl(jsonl, image_root)
    assert len(caught.value.problems) == 50 and caught.value.omitted == 10
    assert str(caught.value).splitlines()[-1] == "... and 10 more"


def test_missing_file_root_or_rows_are_reported(tmp_path: Path, image_root: Path) -> None:
    with pytest.raises(DataImportError, match="file not found"):
        import_preference_jsonl(tmp_path / "absent.jsonl", image_root)
    with pytest.raises(DataImportError, match="is not a directory"):
        import_preference_jsonl(_write(tmp_path / "p.jsonl", [_row()]), tmp_path / "no-root")
    with pytest.raises(DataImportError, match="no rows"):
        import_preference_jsonl(_write(tmp_path / "blank.jsonl", ["", "  "]), image_root)


@pytest.mark.parametrize(("image", "expected_reason"), [
    ("img/a\x00.png", "image path 'img/a\\x00.png' holds control character U+0000"),
    ("img/" + "x" * 300 + ".png", "cannot be opened (File name too long)"),
    ("img/loop1", "image path 'img/loop1' is a symlink loop"),
], ids=["nul-byte", "name-too-long", "symlink-loop"])
def test_an_unresolvable_image_path_is_a_named_bad_row(tmp_path: Path, image_root: Path, image: str,
                                                       expected_reason: str) -> None:
    """pathlib raises ValueError, OSError or RuntimeError on these; each must be a row problem, not a crash."""
    (image_root / "img" / "loop1").symlink_to("loop2")
    (image_root / "img" / "loop2").symlink_to("loop1")
    jsonl = _write(tmp_path / "prefs.jsonl", [_row(image), _row(), _row("img/missing.png")])
    with pytest.raises(DataImportError) as caught:
        import_preference_jsonl(jsonl, image_root)
    assert [p.line for p in caught.value.problems] == [1, 3]
    assert expected_reason in caught.value.problems[0].reason


def test_a_repeated_field_is_refused_not_resolved_by_last_wins(tmp_path: Path, image_root: Path) -> None:
    """JSON readers disagree on which duplicate wins: a swapped chosen/rejected or unit_id must not pass silently."""
    row = ('{"prompt": "what color?", "chosen": "blue", "rejected": "red", "chosen": "red", "rejected": "blue", '
           '"unit_id": "patient-1", "unit_id": "patient-2", "images": ["img/a.png"]}')
    jsonl = _write(tmp_path / "prefs.jsonl", [_row(), row])
    with pytest.raises(DataImportError) as caught:
        import_preference_jsonl(jsonl, image_root)
    assert [(p.line, p.reason) for p in caught.value.problems] == [
        (2, "field(s) ['chosen', 'rejected', 'unit_id'] appear more than once; keep one of each")]


@pytest.mark.parametrize(("line", "expected_reason"), [
    ('{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}", "arrays or objects nested too deeply to read"),
    ('{"prompt": ' + "9" * 5000 + "}", "a number with more than 4300 digits; no field of a row is a number"),
], ids=["deep-nesting", "huge-integer"])
def test_json_that_json_loads_cannot_read_is_a_bad_row(tmp_path: Path, image_root: Path, line: str,
                                                       expected_reason: str) -> None:
    """Valid JSON that json.loads raises RecursionError or ValueError on: that row's problem, not a crash."""
    jsonl = _write(tmp_path / "prefs.jsonl", [_row(), line])
    with pytest.raises(DataImportError) as caught:
        import_preference_jsonl(jsonl, image_root)
    assert [p.line for p in caught.value.problems] == [2]
    assert caught.value.problems[0].reason.startswith(expected_reason)


def test_an_exact_repeat_of_a_row_is_refused_but_a_swapped_pair_is_kept(tmp_path: Path, image_root: Path) -> None:
    """A repeat would weigh its pair twice; the same question answered the other way is annotators disagreeing."""
    (image_root / "copy").mkdir()
    (image_root / "copy" / "a-again.png").write_bytes((image_root / "img/a.png").read_bytes())
    kept = [_row(unit_id="p1"), _row(unit_id="p1", chosen="blue", rejected="red"), _row("img/b.png", unit_id="p1")]
    assert len(import_preference_jsonl(_write(tmp_path / "prefs.jsonl", kept), image_root)) == 3
    repeats = [_row(unit_id="p1"), _row("copy/a-again.png", unit_id=" p1 ", kind="color")]
    with pytest.raises(DataImportError) as caught:
        import_preference_jsonl(_write(tmp_path / "prefs.jsonl", kept + repeats), image_root)
    says = ("repeats line 1 (same image, prompt, chosen, rejected and unit_id): the pair would weigh twice in "
            "training; remove one")
    assert [(p.line, p.reason) for p in caught.value.problems] == [(4, says), (5, says)]


@pytest.mark.parametrize(("field", "value", "expected_reason"), [
    ("prompt", "what \ud800 color?", "field 'prompt' holds a lone surrogate (a \\ud800-\\udfff escape)"),
    ("unit_id", "patient-\udfff", "field 'unit_id' holds a lone surrogate"),
    ("prompt", "what\x00color?", "field 'prompt' holds control character U+0000"),
    ("chosen", "red\x1b[0m", "field 'chosen' holds control character U+001B"),
    ("unit_id", "patient-1\x7f", "field 'unit_id' holds control character U+007F"),
    ("prompt", "<image> what color?", "field 'prompt' holds the chat template's marker '<image>'"),
    ("chosen", "red<|end|>", "field 'chosen' holds the chat template's marker '<|end|>'"),
    ("rejected", "<|assistant|>blue", "field 'rejected' holds the chat template's marker '<|assistant|>'"),
], ids=["surrogate-prompt", "surrogate-unit", "nul", "escape", "delete", "image-token", "end-token",
        "role-token"])
def test_text_the_model_cannot_take_as_written_is_refused(tmp_path: Path, image_root: Path, field: str,
                                                           value: str, expected_reason: str) -> None:
    """Surrogates fail only later, at training's UTF-8 encode; a chat marker in the text forges the template."""
    jsonl = _write(tmp_path / "prefs.jsonl", [_row(), _row(**{field: value})])
    with pytest.raises(DataImportError) as caught:
        import_preference_jsonl(jsonl, image_root)
    assert [p.line for p in caught.value.problems] == [2]
    assert caught.value.problems[0].reason.startswith(expected_reason)


def test_tabs_newlines_and_non_ascii_text_still_import(tmp_path: Path, image_root: Path) -> None:
    jsonl = _write(tmp_path / "prefs.jsonl", [_row(prompt="quelle couleur ?\tété", chosen="rouge\nvif",
                                                   rejected="<b>bleu</b> 🙂", unit_id="patiënt-1")])
    (pair,) = import_preference_jsonl(jsonl, image_root)
    assert (pair.prompt, pair.chosen, pair.rejected, pair.unit_id) == (
        "quelle couleur ?\tété", "rouge\nvif", "<b>bleu</b> 🙂", "patiënt-1")


def test_the_refused_markers_are_the_tiny_vlm_tokenizers_special_tokens() -> None:
    """The importer keeps its own list so `mor_secure.data` need not load torch; this pins the two together."""
    from mor_secure.data.text_rules import CHAT_TEMPLATE_MARKERS
    from mor_secure.models.tiny_vlm import SPECIAL_TOKENS

    assert sorted(CHAT_TEMPLATE_MARKERS) == sorted(SPECIAL_TOKENS)


def test_the_declared_unit_holds_every_row_to_it(tmp_path: Path, image_root: Path) -> None:
    """data.unit: patient refuses a row without its patient (it would be protected per image only); image refuses a
    row that names one. Both listed with their lines, nothing imported; undeclared, each row is taken as it comes."""
    jsonl = _write(tmp_path / "prefs.jsonl", [_row(unit_id="patient-1"), _row("img/b.png")])
    with pytest.raises(DataImportError, match=r"prefs.jsonl:2: no unit_id, but data.unit is patient") as refused:
        import_preference_jsonl(jsonl, image_root, unit="patient")
    assert len(refused.value.problems) == 1
    with pytest.raises(DataImportError, match=r"prefs.jsonl:1: unit_id 'patient-1', but data.unit is image") as refused:
        import_preference_jsonl(jsonl, image_root, unit="image")
    assert len(refused.value.problems) == 1
    assert len(import_preference_jsonl(jsonl, image_root)) == 2


def test_a_row_refused_for_lacking_its_unit_id_gives_the_rows_of_its_image_no_second_error(
        tmp_path: Path, image_root: Path) -> None:
    """The refused row is not the image's first: the next row of that image, which names its patient, is fine."""
    jsonl = _write(tmp_path / "prefs.jsonl", [_row("img/b.png", unit_id="patient-0"), _row(),
                                              _row(unit_id="patient-1", chosen="green")])
    with pytest.raises(DataImportError) as caught:
        import_preference_jsonl(jsonl, image_root, unit="patient")
    assert [(p.line, p.reason.split(":")[0]) for p in caught.value.problems] == [
        (2, "no unit_id, but data.unit is patient")]
