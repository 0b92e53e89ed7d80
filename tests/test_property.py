"""Property tests at the door: every number flag of every subcommand, driven through the real CLI parser and
config checks with bad values (wrong type, NaN, ±inf, huge, negative, empty) and with generated ones. A bad
value ends with exit status 2 and exactly one ``mtp: error:`` line naming the flag, no traceback, nothing
written; no value ever escapes as another exception. Nothing is run: the commands' run functions are stubbed."""

import dataclasses
import os
import typing

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mtp import cli
from mtp.config import field_type, flag_of
from tests.test_config import REQUIRED  # what each command needs besides the flag under test

# (command, flag, base type) of every number flag of every subcommand
NUMBER_FLAGS = []
for _name, _cmd in cli.COMMANDS.items():
    _hints = typing.get_type_hints(_cmd.config)
    for _f in dataclasses.fields(_cmd.config):
        _base = field_type(_hints[_f.name])[0]
        if _base in (int, float) and _f.metadata.get("cli", True) and not _f.metadata.get("positional"):
            NUMBER_FLAGS.append((_name, flag_of(_f), _base))

# Flags where a negative number means something (none today: every count, size, rate, time and probability
# is >= 0).
NEGATIVE_ALLOWED: set[tuple[str, str]] = set()

ALWAYS_BAD = ["nan", "NaN", "inf", "-inf", "1e400", "-1e400", "abc", "", "1,5", "\u00e9", str(10 ** 30),
              str(-10 ** 30)]


@pytest.fixture
def stubbed(monkeypatch, tmp_path):
    """main() with every command's run function replaced by a no-op, in an empty working folder."""
    real_load = cli._load
    monkeypatch.setattr(cli, "_load", lambda ref: (lambda cfg, command: None) if ref.split(":")[1] in
                        {c.run.split(":")[1] for c in cli.COMMANDS.values()} else real_load(ref))
    monkeypatch.setattr(cli, "_quiet_libraries", lambda: None)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def outcome(capsys, argv: list[str]) -> tuple[int, str]:
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.err + captured.out


def assert_refused(code: int, text: str, flag: str, argv) -> None:
    lines = text.strip().splitlines()
    assert code == 2, (argv, code, text)
    assert len(lines) == 1 and lines[0].startswith("mtp: error:"), (argv, text)
    assert "Traceback" not in text
    assert flag in lines[0] or flag.lstrip("-").replace("-", "_") in lines[0], (argv, lines[0])


@pytest.mark.parametrize("command,flag,base", NUMBER_FLAGS, ids=[f"{c}:{f}" for c, f, _ in NUMBER_FLAGS])
def test_bad_numbers_are_refused_in_one_line(stubbed, capsys, command, flag, base):
    values = ALWAYS_BAD + (["1.5"] if base is int else [])
    if (command, flag) not in NEGATIVE_ALLOWED:
        values.append("-5")
    for value in values:
        argv = [*command.split(), *REQUIRED.get(command, []), f"{flag}={value}"]
        code, text = outcome(capsys, argv)
        assert_refused(code, text, flag, argv)
    assert list(stubbed.iterdir()) == []  # nothing written


NUMBER_TEXT = st.one_of(
    st.integers(min_value=-2 ** 70, max_value=2 ** 70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=12),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=st.sampled_from(NUMBER_FLAGS), value=NUMBER_TEXT)
def test_any_number_is_accepted_or_refused_in_one_line(stubbed, capsys, case, value):
    command, flag, _ = case
    argv = [*command.split(), *REQUIRED.get(command, []), f"{flag}={value}"]
    code, text = outcome(capsys, argv)
    assert code in (0, 2), (argv, code, text)
    assert "Traceback" not in text
    if code == 2:
        assert_refused(code, text, flag, argv)


@pytest.mark.parametrize("argv", [
    ["generate", os.fsdecode(b"caf\xe9 au lait")],  # a Latin-1 prompt from a shell with another locale
    ["generate", "hi", "--stop", os.fsdecode(b"\xff")],
    ["serve", "--served-model-name", os.fsdecode(b"\xfe")],
])
def test_text_that_is_not_utf8_is_refused_in_one_line(stubbed, capsys, argv):
    code, text = outcome(capsys, argv)
    lines = text.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "UTF-8" in lines[0], text
