import shutil

import pytest

from fedrad.commands.cli import build_parser, main
from fedrad.core.config import RunConfig

SUBCOMMANDS = ["synth", "simulate", "evaluate", "demo", "import-npz", "site", "site check"]


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([*command.split(), "--help"])

    assert info.value.code == 0
    assert "usage: fedrad " + command in capsys.readouterr().out


def test_simulate_options_map_one_to_one_onto_run_config_keys():
    parser = build_parser()
    simulate = parser._subparsers._group_actions[0].choices["simulate"]
    options = {s[2:] for a in simulate._actions for s in a.option_strings if s.startswith("--")}

    keys = set(RunConfig().to_user_config()) - {"sites-dir"}
    assert keys <= options
    assert options - keys == {"help", "client-cpus", "out"}


def test_unknown_model_is_refused_with_a_hint(sites_2d, tmp_path, capsys):
    code = main(["simulate", str(sites_2d), "--out", str(tmp_path / "r"), "--model", "cnnn"])

    err = capsys.readouterr().err
    assert code == 2
    assert "cnnn" in err and "did you mean 'cnn'" in err.lower()


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--num-server-rounds", "0", "num-server-rounds"),
        ("--learning-rate", "fast", "learning-rate"),
        ("--strategy", "fedsgd", "strategy"),
    ],
)
def test_invalid_option_value_is_explained(sites_2d, tmp_path, capsys, option, value, message):
    code = main(["simulate", str(sites_2d), "--out", str(tmp_path / "r"), option, value])

    assert code == 2
    assert message in capsys.readouterr().err


def test_missing_sites_folder_names_the_fix(tmp_path, capsys):
    code = main(["simulate", str(tmp_path / "nowhere")])

    err = capsys.readouterr().err
    assert code == 2
    assert "does not exist" in err and "fedrad synth" in err


def test_site_with_no_usable_samples_is_refused_before_training(sites_2d, tmp_path, capsys):
    sites = tmp_path / "sites"
    shutil.copytree(sites_2d / "site-1", sites / "site-1")
    broken = sites / "site-2"
    (broken / "images").mkdir(parents=True)
    (broken / "images" / "a.dcm").write_bytes(b"garbage" * 100)
    (broken / "labels.csv").write_text("id,label\nimages/a.dcm,1\n")

    code = main(["simulate", str(sites), "--out", str(tmp_path / "r")])

    err = capsys.readouterr().err
    assert code == 2
    assert "site-2" in err and "no usable samples" in err


def test_version_is_printed(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])

    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("fedrad ") and out.split()[1][0].isdigit()


@pytest.mark.parametrize(
    ("argv", "suggestion"),
    [
        (["simulate", "x", "--num-rounds", "3"], "did you mean --num-server-rounds?"),
        (["site", "check", "x", "--jsn", "f"], "did you mean --json?"),
    ],
)
def test_mistyped_option_gets_a_suggestion(argv, suggestion, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)

    assert info.value.code == 2
    assert suggestion in capsys.readouterr().err


@pytest.mark.parametrize(
    ("option", "choices"),
    [
        ("--strategy", "{fedavg,fedprox,fedadam,fedmedian,fedtrimmedavg,krum}"),
        ("--dp", "{off,sample,client}"),
        ("--kind", "{2d,3d}"),
    ],
)
def test_usage_lists_the_choices(option, choices):
    usage = build_parser().subcommands["simulate"].format_usage()

    assert f"[{option} {choices}]" in " ".join(usage.split())


def test_counts_print_as_integers(capsys):
    from fedrad.commands.cli import _print_scores

    _print_scores("t", {"num-examples": 195, "round": 12, "auc": 0.98765})

    out = capsys.readouterr().out
    assert "195" in out and "195.0" not in out and "0.9877" in out


def test_missing_study_id_names_the_simulate_option(sites_2d, tmp_path, capsys):
    code = main(["simulate", str(sites_2d), "--out", str(tmp_path / "r"), "--dp", "sample"])

    err = capsys.readouterr().err
    assert code == 2
    assert "'study-id' is required" in err and "--study-id" in err
