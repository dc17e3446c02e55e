"""Static guarantees: nothing is unpickled, and DVC runs fixed commands."""

import re

import yaml
from conftest import PROJECT

UNSAFE = re.compile(r"\b(pickle\.loads?|torch\.load|joblib\.load|np\.load\([^)]*allow_pickle=True)")


def test_no_code_path_unpickles_anything():
    sources = [*(PROJECT / "src").rglob("*.py"), *(PROJECT / "stages").glob("*.py")]
    offenders = [f"{path.name}: {m.group(0)}" for path in sources for m in UNSAFE.finditer(path.read_text())]
    assert offenders == []


def test_stage_commands_are_fixed_scripts_without_shell_interpolation():
    stages = yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]
    assert set(stages) == {"download", "balance", "split", "pad-encode", "fetch-weights", "finetune", "evaluate"}
    for name, stage in stages.items():
        assert re.fullmatch(r"python stages/[a-z_]+\.py", stage["cmd"]), (name, stage["cmd"])
        script = stage["cmd"].split()[1]
        assert script in stage["deps"] and (PROJECT / script).is_file()
