"""dwskd as an installed package: the wheel, its configs, the console scripts, ``import dwskd``.

The wheel is built from a copy of the sources (no ``build/`` left in the checkout) with the
venv's own setuptools (``--no-build-isolation``: no network), unpacked, and run from an empty
directory with only the unpacked wheel on ``sys.path`` ahead of the venv's site-packages, so
the checkout's ``conf/`` cannot be what the commands find.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SCRIPTS = {  # console script -> module
    "dwskd": "dwskd.run",
    "dwskd-select": "dwskd.select_student",
    "dwskd-predict": "dwskd.predict",
    "dwskd-eval": "dwskd.evaluate",
    "dwskd-export": "dwskd.export",
}
HEAVY = ("torch", "lightning", "timm")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="offline", NO_ALBUMENTATIONS_UPDATE="1")
    return {**env, **extra}


def _python(*args: str, cwd: Path, pythonpath: Path | None = None, timeout: int = 120):
    extra = {"PYTHONSAFEPATH": "1"}  # the cwd (an empty dir anyway) is not put on sys.path
    if pythonpath is not None:
        extra["PYTHONPATH"] = str(pythonpath)
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=_env(**extra),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("src")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("dwskd", "conf"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    out = tmp_path_factory.mktemp("wheel")
    cmd = [
        "-m",
        "pip",
        "wheel",
        str(src),
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(out),
    ]
    done = _python(*cmd, "--no-index", cwd=out, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    (built,) = out.glob("dwskd-*.whl")
    return built


@pytest.fixture(scope="module")
def unpacked(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("site")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(target)
    return target


def _wheel_metadata(wheel: Path) -> tuple[list[str], str, str]:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        info = next(n for n in names if n.endswith(".dist-info/METADATA"))
        entry = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        return names, archive.read(info).decode(), archive.read(entry).decode()


def test_wheel_holds_every_config_and_module(wheel: Path) -> None:
    names, metadata, entry_points = _wheel_metadata(wheel)
    configs = {p.relative_to(REPO).as_posix() for p in (REPO / "conf").rglob("*.yaml")}
    assert "conf/config.yaml" in configs and "conf/select.yaml" in configs
    shipped = {n.removeprefix("dwskd/") for n in names if n.startswith("dwskd/conf/")}
    assert configs == shipped, f"configs missing from the wheel: {sorted(configs - shipped)}"
    modules = {
        p.relative_to(REPO).as_posix()
        for p in (REPO / "dwskd").rglob("*.py")
        if "__pycache__" not in p.parts
    }
    missing = sorted(modules - set(names))
    assert not missing, (
        f"{missing} are not in the wheel: list their package in [tool.setuptools] packages"
    )
    for script, module in SCRIPTS.items():
        assert f"{script} = {module}:main" in entry_points
    assert Parser().parsestr(metadata)["Version"] == _source_version()


def _source_version() -> str:
    tree = ast.parse((REPO / "dwskd" / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "__version__":
            return ast.literal_eval(node.value)
    raise AssertionError("dwskd/__init__.py has no __version__")


def _top_level_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_imported_package_is_declared(wheel: Path) -> None:
    """Each third-party module dwskd imports (also inside functions) is a Requires-Dist."""
    _, metadata, _ = _wheel_metadata(wheel)
    declared = {
        _normalise(re.split(r"[\s;<>=!~\[(]", req, maxsplit=1)[0])
        for req in Parser().parsestr(metadata).get_all("Requires-Dist", [])
    }
    imported = set().union(*map(_top_level_imports, (REPO / "dwskd").rglob("*.py")))
    third_party = imported - set(sys.stdlib_module_names) - {"dwskd", "__future__"}
    providers = importlib.metadata.packages_distributions()
    undeclared = {
        module: providers.get(module, ["<not installed>"])
        for module in sorted(third_party)
        if not declared & {_normalise(d) for d in providers.get(module, [])}
    }
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"


def _hand_built_config_paths(path: Path) -> list[str]:
    """Code (not docstrings) naming the conf dir itself: ``"conf"``, ``"../conf"`` or a string
    ``config_path=`` of a call."""
    tree = ast.parse(path.read_text(), str(path))
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if id(node) not in docstrings and re.fullmatch(r"(\.\./)*conf/?", node.value):
                found.append(node.lineno)
        elif isinstance(node, ast.keyword) and node.arg == "config_path":
            if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
                found.append(node.value.lineno)
    return [f"{path.relative_to(REPO)}:{line}" for line in sorted(set(found))]


def test_configs_are_found_through_dwskd_config_dir() -> None:
    """Hydra entry points take their configs from ``dwskd.CONFIG_DIR``, never a hand-built path.

    A path built from ``__file__`` (``parent.parent / "conf"``, ``"../conf"``) finds the
    checkout's conf/ but not the wheel's dwskd/conf/.
    """
    offenders = [
        hit
        for path in sorted((REPO / "dwskd").rglob("*.py"))
        if path != REPO / "dwskd" / "__init__.py"
        for hit in _hand_built_config_paths(path)
    ]
    assert not offenders, "use dwskd.CONFIG_DIR instead: " + ", ".join(offenders)


_ENTRY = "import sys, dwskd; print('DWSKD', dwskd.__file__); from {module} import main; sys.argv[0] = {script!r}; sys.exit(main())"


@pytest.mark.parametrize(
    ("how", "expected"),
    [
        (("-m", "dwskd.run"), ("method:", "model:", "teacher:", "data:", "trainer:")),
        (("-c", _ENTRY.format(module="dwskd.run", script="dwskd")), ("method:", "model:")),
        (("-c", _ENTRY.format(module="dwskd.select", script="dwskd-select")), ("selection:",)),
    ],
    ids=["python -m dwskd.run", "dwskd", "dwskd-select"],
)
def test_installed_wheel_finds_its_configs(
    how: tuple[str, str], expected: tuple[str, ...], unpacked: Path, tmp_path: Path
) -> None:
    done = _python(*how, "--cfg", "job", cwd=tmp_path, pythonpath=unpacked)
    assert done.returncode == 0, done.stdout + done.stderr
    for key in expected:
        assert re.search(rf"^{key}", done.stdout, re.MULTILINE), done.stdout
    if how[0] == "-c":
        where = done.stdout.splitlines()[0].removeprefix("DWSKD ")
        assert Path(where).is_relative_to(unpacked), f"dwskd came from {where}, not the wheel"
    assert not list(tmp_path.iterdir()), "--cfg job wrote into the working directory"


def _script_param(script: str, module: str):
    path = REPO / (module.replace(".", "/") + ".py")
    missing = pytest.mark.xfail(
        not path.exists(), reason=f"{path.relative_to(REPO)} does not exist yet", strict=True
    )
    return pytest.param(script, module, id=script, marks=missing)


@pytest.fixture(scope="module")
def helps(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, str]]:
    """``<script> --help`` of every installed console script, all started at once (each one
    that imports torch takes seconds)."""
    cwd = tmp_path_factory.mktemp("help")
    running = {
        script: subprocess.Popen(
            [str(BIN / script), "--help"],
            cwd=cwd,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for script in SCRIPTS
        if (BIN / script).exists()
    }
    results = {}
    for script, process in running.items():
        output = process.communicate(timeout=180)[0]  # reads the pipe while waiting: no stall
        results[script] = (process.returncode, output)
    return results


@pytest.mark.parametrize(("script", "module"), [_script_param(*item) for item in SCRIPTS.items()])
def test_console_script_help(script: str, module: str, helps: dict[str, tuple[int, str]]) -> None:
    if script not in helps:
        pytest.skip(f"{BIN / script} is not installed: run `make install` (pip install -e .)")
    returncode, output = helps[script]
    assert returncode == 0, output
    assert output.strip(), "--help printed nothing"


def test_import_dwskd_and_help_stay_light(tmp_path: Path) -> None:
    """``import dwskd`` (and the entry module) loads neither torch nor Lightning nor timm."""
    code = (
        "import sys, dwskd, dwskd.run; "
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]; "
        "assert not heavy, heavy; print(dwskd.__version__)"
    )
    done = _python("-c", code, cwd=tmp_path, pythonpath=REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == _source_version()


def test_public_api() -> None:
    import dwskd
    from dwskd import model_folder, selection

    assert set(dwskd.__all__) <= set(dir(dwskd))
    assert dwskd.select_weights is selection.initialize_from_teacher
    assert dwskd.SelectionRecipe is selection.SelectionRecipe
    assert callable(dwskd.load_model)
    with pytest.raises(model_folder.ExportError):
        dwskd.load_model(REPO / "conf")  # neither a model folder nor a finished run dir
    assert (Path(dwskd.CONFIG_DIR) / "config.yaml").is_file()
    with pytest.raises(AttributeError):
        dwskd.no_such_name  # noqa: B018
    try:
        version = importlib.metadata.version("dwskd")
    except importlib.metadata.PackageNotFoundError:
        version = None
    if version is not None:  # installed (editable or not): metadata and source agree
        assert version == dwskd.__version__


def test_public_api_is_lazy_and_points_at_the_real_functions() -> None:
    """``dwskd.predict_files`` is :func:`dwskd.inference.predict_files` (the API name differs
    from the ``dwskd.predict`` command module, so importing one never shadows the other)."""
    import dwskd
    from dwskd.inference import predict_files
    from dwskd.selection import initialize_from_teacher

    assert dwskd.predict_files is predict_files
    assert dwskd.select_weights is initialize_from_teacher
