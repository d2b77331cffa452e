"""The README's two commands stay true: CI runs exactly the README's test command."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _readme_commands():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_readme_opens_with_train_and_test_commands():
    commands = _readme_commands()
    assert len(commands) == 2, commands
    assert commands[0].endswith("tfp-seg train")
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert (
        _readme_commands()[1]
        in ci.splitlines()[
            ci.splitlines().index(
                next(line for line in ci.splitlines() if "pytest" in line and "pip install" in line)
            )
        ]
    )


def test_ci_runs_the_readme_main_command_as_written():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    main_command = _readme_commands()[0]
    assert any(line.strip().startswith(main_command) for line in ci), main_command


def test_constraints_pin_the_stack():
    pins = dict(
        line.split("==")
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    for name in ("tensorflow", "keras", "tensorflow-probability", "tf_keras", "numpy"):
        key = next((k for k in pins if k.lower().replace("_", "-") == name.replace("_", "-")), None)
        assert key is not None, f"{name} is not pinned in constraints.txt"
