"""One root exception per layer (ModelError, IndexerError, AppError) and one user-error branch (UserError):
every error class the project defines hangs off its layer's root, and every user error's code is one the API
documents, so the CLI and the routes can map by class with no hand-kept list."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import app
import indexer
import model
from app.errors import ERROR_CODES, AppError
from indexer.errors import IndexerError
from model.errors import ModelError, UserError

ROOTS = {"model": ModelError, "indexer": IndexerError, "app": AppError}


def _project_errors() -> list[type[BaseException]]:
    for package in (model, indexer, app):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if info.name.endswith("__main__"):
                continue
            importlib.import_module(info.name)
    found = []
    stack: list[type[BaseException]] = [Exception]
    seen: set[type[BaseException]] = set()
    while stack:
        cls = stack.pop()
        for sub in cls.__subclasses__():
            if sub not in seen:
                seen.add(sub)
                stack.append(sub)
                if sub.__module__.split(".")[0] in ROOTS:
                    found.append(sub)
    return found


def test_every_error_class_derives_from_its_layers_root() -> None:
    errors = _project_errors()
    assert len(errors) > 30
    strays = [
        f"{cls.__module__}.{cls.__qualname__}"
        for cls in errors
        if cls not in ROOTS.values()
        and cls is not UserError
        and not issubclass(cls, ROOTS[cls.__module__.split(".")[0]])
        and not cls.__module__.startswith("app.errors")  # ApiError is FastAPI's HTTPException
    ]
    assert strays == []


def test_every_user_error_has_a_documented_code() -> None:
    for cls in _project_errors():
        if issubclass(cls, UserError):
            assert cls.code in ERROR_CODES, f"{cls.__qualname__}.code = {cls.code!r} is not in app.errors"
            assert ERROR_CODES[cls.code][0] != 500, f"{cls.__qualname__} is a user error, not a bug"


def test_the_cli_shows_any_user_error_as_its_message(
    monkeypatch: pytest.MonkeyPatch, capsys, tmp_path
) -> None:
    # A class no list anywhere names: the CLI maps it by its branch.
    from indexer import cli

    class BrandNewProblem(IndexerError, UserError):
        exit_code = 3

    def fail(env: object) -> int:
        raise BrandNewProblem("the thing you asked for cannot be done: do this instead")

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    parser._subparsers._group_actions[0].choices["stats"].set_defaults(fn=fail)  # type: ignore[union-attr]
    code = cli.main(["stats", "--data-dir", str(tmp_path / "data")])
    err = capsys.readouterr().err
    assert code == 3 and "indexer stats: the thing you asked for cannot be done: do this instead" in err
