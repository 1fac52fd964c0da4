"""Command-line usage errors through the installed ``ssd-run`` console script.

Each case runs the real entry point (the script pip wrote next to this interpreter, as a
user would), not ``main()`` in-process: a usage error must print Typer's usage message
on stderr and exit 2, with no traceback, whatever typer (and click, or none) the install
resolved. No case trains or imports Keras: each takes about a second.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ssd_keras.cli import app

BIN = Path(sys.executable).parent


def console_script() -> str:
    found = shutil.which("ssd-run", path=str(BIN))
    assert found, f"no ssd-run console script in {BIN}: install the project (pip install -e .)"
    return found


def command_names():
    return sorted(c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands)


COMMANDS = set(command_names())


def test_the_commands_main_routes_are_the_registered_ones():
    """``main`` sends a first argument that is no command to ``train``: it must know them
    all, the ones added later (``import``) included."""
    from ssd_keras.cli import _command_names

    assert _command_names() == COMMANDS and {"train", "sample", "import"} <= COMMANDS


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    path = tmp_path_factory.mktemp("usage") / "p.toml"
    path.write_text("[process]\nimage_size = 16\nlevels = 3\n")
    return path


# argv (PIPE: an existing pipeline file), what stderr must say
CASES = [
    # an unknown option on each command (train also as "ssd-run PIPELINE ...")
    *[([name, "--bogus"], "No such option") for name in sorted(COMMANDS)],
    (["PIPE", "--bogus"], "No such option"),
    (["--bogus"], "No such option"),
    # an option without its value
    (["sample", "--steps"], "requires an argument"),
    (["PIPE", "--set"], "requires an argument"),
    (["evaluate", "--num-images"], "requires an argument"),
    (["inspect", "PIPE", "--plot"], "requires an argument"),
    # a value of the wrong type: the message names the value as typed (click's messages
    # did; typer >= 0.2x's pydantic ones do not, cli._name_the_value puts it back)
    (["sample", "--steps", "abc"], "Invalid value for '--steps': 'abc' is not"),
    (["PIPE", "--steps", "abc"], "Invalid value for '--steps': 'abc' is not"),
    (["inspect", "PIPE", "--steps", "2.5"], "Invalid value for '--steps': '2.5' is not"),
    (["inspect", "PIPE", "--steps", "3", "--steps", "x"], "Invalid value for '--steps': 'x' is not"),
    (["evaluate", "--num-samples", "many"], "'many' is not"),
    (["sample", "-n3x"], "'3x' is not"),
    (["sample", "--eta", "half"], "Invalid value for '--eta': 'half' is not"),
    (["evaluate", "--seed", "1e3"], "Invalid value for '--seed': '1e3' is not"),
    (["sample", "--steps="], "Invalid value for '--steps': '' is not"),
    # an unknown command that names no file, and a missing argument
    (["smaple"], "No such command 'smaple'"),
    (["inspect"], "Missing argument"),
    # the edits (docs/scale_space_edits.md)
    (["upsample", "some_run"], "Missing argument"),
    (["vary", "some_run", "image.png"], "Missing option '--level'"),
    (["interpolate", "some_run", "--seeds", "1"], "requires 2 arguments"),
    (["upsample", "some_run", "x.png", "--strength", "high"], "Invalid value for '--strength'"),
]


@pytest.mark.parametrize("argv, expected", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_usage_errors_exit_2_with_typers_message(argv, expected, pipeline, tmp_path):
    argv = [str(pipeline) if a == "PIPE" else a for a in argv]
    result = subprocess.run([console_script(), *argv], capture_output=True, text=True,
                            cwd=tmp_path)
    err = result.stderr
    assert result.returncode == 2, (result.returncode, err)
    assert "Traceback" not in err and "Error" in err, err
    assert expected in err, err
    assert "Usage: ssd-run" in err or "for help" in err, err
    assert not (tmp_path / "runs").exists()  # nothing started


def test_a_pipeline_path_still_means_train(tmp_path):
    """A first argument written as a path is a pipeline to train, even if it is missing."""
    result = subprocess.run([console_script(), str(tmp_path / "missing.toml")],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert "pipeline file not found" in result.stderr and "Traceback" not in result.stderr


def test_every_import_is_declared():
    """ssd_keras imports only what pyproject declares (dependencies or an extra), not what a
    dependency happens to bring along: typer >= 0.29 no longer installs click, for one."""
    import ast
    import importlib.metadata as md
    import re

    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    root = Path(__file__).parent.parent
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + sum(project["optional-dependencies"].values(), [])
    declared = {_normalize(re.match(r"[A-Za-z0-9_.-]+", r).group()) for r in requirements}
    declared |= {"tensorflow"} if "tensorflow-cpu" in declared else set()
    stdlib = set(sys.stdlib_module_names) | {"tomllib"}  # tomllib: tomli before Python 3.11
    distributions = md.packages_distributions()
    undeclared = []
    for path in sorted((root / "ssd_keras").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in stdlib or top == "ssd_keras":
                    continue
                dists = distributions.get(top, [top])  # an optional backend may be absent
                if not any(_normalize(d) in declared for d in dists):
                    undeclared.append(f"{path.relative_to(root)}: import {name} ({', '.join(dists)})")
    assert not undeclared, undeclared


def _normalize(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")
