"""Running the `kdistill` command in-process, shared by the CLI tests."""
import yaml
from typer.testing import CliRunner

from kdistill.cli import app

runner = CliRunner()


def write(tmp_path, recipe, name="r.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result, result.output + (result.stderr if result.stderr_bytes is not None else "")
