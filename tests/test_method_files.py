"""What every method file shares (README "Method files"): the eval interface with one features signature, the
skeleton (only `import common`, Args, PRESETS above main), and --help documenting every field."""

import dataclasses
import importlib
import inspect
import re

import pytest

import eval_probe

METHODS = eval_probe.available_methods()


def test_every_method_file_is_discovered():
    assert {"simclr", "mae", "igpt", "can"} <= set(METHODS)


@pytest.mark.parametrize("method", METHODS)
def test_help_documents_every_field(method, capsys):
    module = importlib.import_module(method)
    with pytest.raises(SystemExit):
        module.main(["--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(module.Args):
        assert "--" + f.name.replace("_", "-") in out, f.name
        words = f.metadata["help"].split()[:3]
        assert re.search(r"\s+".join(map(re.escape, words)), out), f.name


@pytest.mark.parametrize("method", METHODS)
def test_one_interface_and_one_skeleton(method):
    module = importlib.import_module(method)
    source = inspect.getsource(module)
    assert "from common import" not in source and "\nimport common\n" in source  # call sites read common.X
    params = list(inspect.signature(module.features).parameters)
    assert params == ["model", "images", "layer", "pool"]  # eval_probe calls every method the same way
    assert inspect.signature(module.features).parameters["pool"].default is None
    assert list(inspect.signature(module.build_model).parameters) == ["args"]
    # the file reads top to bottom: Args first, PRESETS just above main()
    assert source.index("class Args") < source.index("def build_model") < source.index("PRESETS = {")
    assert source.index("PRESETS = {") < source.index("def main(") and "def " not in source[
        source.index("PRESETS = {") : source.index("def main(")]  # fmt: skip
