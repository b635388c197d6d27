import argparse
import json

from fixative.core.toy import cli


def _parse(argv):
    parser = argparse.ArgumentParser(prog="fixative")
    cli.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_toy_dataset_command_paints_the_atelier_and_its_grid(tmp_path, capsys):
    args = _parse(
        [
            "toy",
            "dataset",
            "--out",
            str(tmp_path / "atelier"),
            "--resolution",
            "32",
            "--images-per-artist",
            "8",
            "--grid",
            str(tmp_path / "grid.png"),
        ]
    )
    assert args.func(args) == 0
    description = json.loads((tmp_path / "atelier" / "atelier.json").read_text())
    assert description["config"]["resolution"] == 32 and description["splits"]["train"] > 0
    assert (tmp_path / "grid.png").is_file()
    assert "Toy Atelier" in capsys.readouterr().out
