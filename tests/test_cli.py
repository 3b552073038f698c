import pytest

from kimi_operator import cli


def test_workload_commands_take_their_own_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["validate-dataset", "--help"])
    assert info.value.code == 0
    assert "--cutoff-len" in capsys.readouterr().out


def test_operator_commands_still_parse_their_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["run", "--help"])
    assert info.value.code == 0
    assert "--prepare-image" in capsys.readouterr().out
