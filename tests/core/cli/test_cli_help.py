"""The command line agrees with itself: every option of every sub-command says its default, and the options every
command shares (--device, --dtype, --quiet, --seed, --config) are spelled and explained the same way."""

import argparse

from fixative.cli import build_parser


def sub_commands(parser: argparse.ArgumentParser, path=("fixative",)):
    """(path, parser) for every command and sub-command, recursively."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield (*path, name), child
                yield from sub_commands(child, (*path, name))


def options(parser: argparse.ArgumentParser):
    return [
        a
        for a in parser._actions
        if a.option_strings and not isinstance(a, (argparse._HelpAction, argparse._VersionAction))
    ]


def test_every_option_of_every_command_says_its_default():
    missing = [
        f"{' '.join(path)} {action.option_strings[-1]}"
        for path, parser in sub_commands(build_parser())
        for action in options(parser)
        if not action.help or not ("default" in action.help or "required" in action.help)
    ]
    assert not missing, f"options without a stated default: {missing}"


def test_shared_options_have_one_meaning_everywhere():
    meanings = {}
    for _path, parser in sub_commands(build_parser()):
        for action in options(parser):
            name = action.option_strings[-1]
            if name in ("--device", "--dtype", "--quiet", "--config"):
                # --dtype is compute precision in generate, stored precision in convert: the same names, though
                meaning = tuple(action.choices) if name == "--dtype" else (action.help, action.default)
                meanings.setdefault(name, set()).add(meaning)
    assert meanings.keys() >= {"--device", "--quiet", "--config"}
    assert all(len(variants) == 1 for variants in meanings.values()), meanings


def test_registering_the_commands_imports_no_torch():
    """`fixative --help` and argument errors stay instant: heavy imports wait for a command to run."""
    import subprocess
    import sys

    script = "import sys; from fixative.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout == "False\n"
    )
