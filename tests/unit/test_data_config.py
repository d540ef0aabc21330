"""The consortium YAML is validated strictly, with messages that say what to fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from mor_secure.config import ConfigError
from mor_secure.data import ConsortiumSpec, SiloDataSpec, SplitSpec, load_consortium

REPO_ROOT = Path(__file__).resolve().parents[2]

SILO_YAML = """
  - name: {name}
    image_share: {share}
    reliable_kinds: [shape]
    label_flip_rate: 0.2
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "consortium.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def _silos(*name_and_share: tuple[str, float]) -> str:
    return "silos:" + "".join(SILO_YAML.format(name=name, share=share) for name, share in name_and_share)


def test_the_demo_consortium_loads() -> None:
    spec = load_consortium(REPO_ROOT / "mor_cli" / "demo_configs" / "consortium.yaml")
    assert spec.seed == 0 and spec.splits == SplitSpec()
    assert (spec.splits.dev_images, spec.splits.test_images) == (300, None)
    assert [(s.name, s.reliable_kinds, s.image_share, s.label_flip_rate) for s in spec.silos] == [
        ("hospital-a", ["shape"], 0.33, 0.5),
        ("bank-b", ["color"], 0.33, 0.5),
        ("hospital-c", ["yes_no"], 0.33, 0.5),
    ]
    assert spec.silo("bank-b").reliable_kinds == ["color"]
    with pytest.raises(KeyError, match="hospital-a"):
        spec.silo("bank-z")


def test_unknown_key_is_rejected_with_the_file_name(tmp_path: Path) -> None:
    path = _write(tmp_path, "seed: 0\nsede: 1\n" + _silos(("hospital-a", 0.5)))
    with pytest.raises(ConfigError, match=r"consortium\.yaml.*sede"):
        load_consortium(path)


@pytest.mark.parametrize(("text", "key", "line", "first", "fix"), [
    ("seed: 0\n" + _silos(("hospital-a", 0.5)) + "seed: 1\n", "seed", 7, 1, "keep one"),
    (_silos(("hospital-a", 0.5)) + "    label_flip_rate: 0.0\n", "label_flip_rate", 6, 5, "keep one"),
    ("{seed: 0, seed: 1}\n", "seed", 1, 1, "keep one"),
    ("a: &a {seed: 0}\nb: &b {seed: 1}\nc:\n  <<: *a\n  <<: *b\n", "<<", 5, 4, r"one `<<: \[\*a, \*b\]`"),
], ids=["top-level", "nested", "one-line", "two-merges"])
def test_a_repeated_key_is_rejected_with_its_line(tmp_path: Path, text: str, key: str, line: int, first: int,
                                                  fix: str) -> None:
    """Not "the last copy wins": an old block left further down would silently replace the one read."""
    with pytest.raises(ConfigError, match=rf"consortium\.yaml:{line}: key '{key}' is repeated \(first on line "
                                          rf"{first}\); .*{fix}"):
        load_consortium(_write(tmp_path, text))


def test_a_merge_key_may_be_overridden_and_the_loader_stays_safe(tmp_path: Path) -> None:
    spec = ConsortiumSpec.model_validate({"silos": [{"name": "hospital-a", "image_share": 0.5,
                                                     "reliable_kinds": ["shape"], "label_flip_rate": 0.1}]})
    path = _write(tmp_path, "silos:\n  - <<: {image_share: 0.5, reliable_kinds: [shape], label_flip_rate: 0.2}\n"
                            "    name: hospital-a\n    label_flip_rate: 0.1\n")
    assert load_consortium(path) == spec
    # An anchored mapping with a merge of its own, merged once and aliased again: still as written, no repeat.
    path = _write(tmp_path, "silos:\n  - <<: &silo\n      <<: {image_share: 0.5, label_flip_rate: 0.2}\n"
                            "      label_flip_rate: 0.1\n    name: hospital-a\n    reliable_kinds: [shape]\n"
                            "x-copies: [*silo]\n")
    with pytest.raises(ConfigError, match="x-copies"):  # the unknown key, reached only once the YAML has loaded
        load_consortium(path)
    with pytest.raises(ConfigError, match="not valid YAML.*python/object"):
        load_consortium(_write(tmp_path, "seed: !!python/object/apply:os.getcwd []\n"))


def test_a_file_that_is_not_utf8_is_rejected_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "consortium.yaml"
    path.write_bytes(("seed: 0\n" + _silos(("hospital-a", 0.5)) + "# r\xe9sum\xe9\n").encode("latin-1"))
    with pytest.raises(ConfigError, match=r"consortium\.yaml:7: not UTF-8 \(byte 0xe9\); save the file as UTF-8"):
        load_consortium(path)


def test_a_path_that_cannot_be_read_is_a_config_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / ("c" * 300 + ".yaml")  # over NAME_MAX: the OS refuses even to look
    with pytest.raises(ConfigError, match=rf"{path}: cannot read the config file \(File name too long\)"):
        load_consortium(path)
    with pytest.raises(ConfigError, match=rf"{tmp_path / 'missing.yaml'}: config file not found"):
        load_consortium(tmp_path / "missing.yaml")


def test_shares_summing_over_one_are_rejected(tmp_path: Path) -> None:
    path = _write(tmp_path, _silos(("hospital-a", 0.6), ("bank-b", 0.5)))
    with pytest.raises(ConfigError, match="sum to 1.1 > 1"):
        load_consortium(path)


def test_duplicate_silo_names_are_rejected(tmp_path: Path) -> None:
    path = _write(tmp_path, _silos(("hospital-a", 0.3), ("hospital-a", 0.3)))
    with pytest.raises(ConfigError, match=r"repeated: \['hospital-a'\]"):
        load_consortium(path)


def test_shared_splits_must_leave_a_private_pool() -> None:
    with pytest.raises(ValidationError, match="leaves no private images"):
        SplitSpec(sft_images=3000, calibration_images=1000)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"name": "Hospital A"}, "name"),
        ({"image_share": 0.0}, "image_share"),
        ({"label_flip_rate": 0.6}, "label_flip_rate"),
        ({"reliable_kinds": []}, "reliable_kinds"),
        ({"reliable_kinds": ["shape", "shape"]}, "lists a kind twice"),
        ({"reliable_kinds": ["texture"]}, "reliable_kinds"),
    ],
)
def test_bad_silo_fields_are_rejected(fields: dict[str, object], expected: str) -> None:
    values = {"name": "hospital-a", "image_share": 0.3, "reliable_kinds": ["shape"], "label_flip_rate": 0.2}
    with pytest.raises(ValidationError, match=expected):
        SiloDataSpec(**{**values, **fields})


def test_reserved_names_and_empty_silos_are_rejected() -> None:
    def silo(name: str, share: float) -> SiloDataSpec:
        return SiloDataSpec(name=name, image_share=share, reliable_kinds=["color"], label_flip_rate=0.1)

    for reserved in ("sft", "calibration", "dev", "test"):
        with pytest.raises(ValidationError, match="reserved"):
            ConsortiumSpec(silos=[silo(reserved, 0.5)])
    with pytest.raises(ValidationError, match="would get no image"):
        ConsortiumSpec(silos=[silo("tiny", 0.0001)])
    with pytest.raises(ValidationError, match="silos"):
        ConsortiumSpec(silos=[])


def test_dev_and_test_overflow_is_rejected_with_the_fix(tmp_path: Path) -> None:
    path = _write(tmp_path, "splits:\n  dev_images: 600\n  test_images: 500\n" + _silos(("hospital-a", 0.5)))
    with pytest.raises(ConfigError, match=r"consortium\.yaml.*1100 > 1000.*lower one of them"):
        load_consortium(path)


@pytest.mark.parametrize(("names", "field"), [
    ("coordinator: Coordinator One\n", "coordinator"),
    ("coordinator: ''\n", "coordinator"),
    ("auditors: ['']\n", "auditors.0"),
    ("auditors: [auditor, audit/x]\n", "auditors.1"),
    ("auditors: [-auditor]\n", "auditors.0"),
], ids=["spaces-and-capitals", "empty-coordinator", "empty-auditor", "slash", "leading-dash"])
def test_party_names_no_certificate_can_carry_are_rejected(tmp_path: Path, names: str, field: str) -> None:
    """The names become mor://<role>/<name> in certificates: the PKI's own rule (PartyIdentity) applies."""
    path = _write(tmp_path, names + _silos(("hospital-a", 0.5)))
    with pytest.raises(ConfigError, match=rf"consortium\.yaml: invalid ConsortiumSpec: {field}: .*must be 1-63 "
                                          r"lower-case letters, digits or '-', starting and ending with a letter"):
        load_consortium(path)


@pytest.mark.parametrize("name", ["bank-", "-bank", "a" * 64, "bank\n"])
def test_a_silo_name_no_certificate_can_carry_is_rejected(tmp_path: Path, name: str) -> None:
    path = _write(tmp_path, _silos((json.dumps(name), 0.5)))  # a JSON string is a YAML scalar, "\n" included
    with pytest.raises(ConfigError, match=r"silos\.0\.name: .*starting and ending with a letter or digit"):
        load_consortium(path)


def test_names_certificates_can_carry_are_kept() -> None:
    silo = SiloDataSpec(name="a" * 63, image_share=0.5, reliable_kinds=["color"], label_flip_rate=0.1)
    spec = ConsortiumSpec(silos=[silo], coordinator="coord-1", auditors=["auditor", "a"])
    assert (spec.silos[0].name, spec.coordinator, spec.auditors) == ("a" * 63, "coord-1", ["auditor", "a"])


def test_the_sft_config_says_the_vision_warm_up_trains_only_the_vision_tower() -> None:
    """pretrain_vision leaves the projector untouched (tests/unit/test_vision_pretraining.py); the text says so."""
    from coordinator.reference import SFTConfig

    description = SFTConfig.model_fields["vision_pretraining"].description
    assert "vision tower" in description and "projector" not in description


def test_yaml_nested_past_what_pyyaml_can_read_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"consortium\.yaml: nested too deeply to read as YAML"):
        load_consortium(_write(tmp_path, "seed: " + "[" * 5000 + "]" * 5000 + "\n"))
