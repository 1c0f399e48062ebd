"""The reference under docs/ keeps up with the code: every setting the code reads, every route of
the app, every `genq` command and option, and every error code the code writes is documented, and
the links between the pages resolve. Fast: no server, no broker, no model."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
SOURCE_DIRS = ("genq", "shared", "services", "workers")  # the package's folders (genq.shared, ...)
SCRIPTS = ROOT / "scripts"
HTTP_METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE"}
# The name of the team's old contract page, which the project must not cite (spelled in two parts
# so that this file does not cite it either).
OLD_CONTRACT = "-".join(("api", "v1")) + ".md"


def _doc_files() -> list[Path]:
    return sorted(DOCS.rglob("*.md"))


@pytest.fixture(scope="module")
def docs() -> str:
    files = _doc_files()
    assert files, f"no reference pages under {DOCS}"
    return "\n".join(p.read_text() for p in files)


def _source_files() -> Iterator[Path]:
    for folder in SOURCE_DIRS:
        yield from sorted((ROOT / folder).rglob("*.py"))


def _source_text() -> str:
    return "\n".join(p.read_text() for p in _source_files())


def _missing(names: set[str], text: str, pattern: str) -> list[str]:
    return sorted(n for n in names if not re.search(pattern.format(re.escape(n)), text))


# --- settings ----------------------------------------------------------------------------------

def code_variables() -> set[str]:
    """`GENQ_*` variables: the fields of every settings object under its env prefix, and every GENQ_
    name written in the package's source and in scripts/ (an env prefix itself, ending in `_`,
    names no variable)."""
    from genq.client import ClientSettings
    from genq.shared.config import Settings
    from genq.workers.settings import WorkerSettings

    names: set[str] = set()
    for model in (Settings, WorkerSettings, ClientSettings):
        prefix = model.model_config.get("env_prefix", "")
        assert prefix.startswith("GENQ_"), prefix
        names |= {prefix + name.upper() for name in model.model_fields}
    texts = [_source_text(), *(p.read_text() for p in sorted(SCRIPTS.iterdir()) if p.is_file())]
    names |= {m for text in texts for m in re.findall(r"\bGENQ_[A-Z0-9_]*[A-Z0-9]\b", text)}
    return names


def test_every_genq_variable_is_documented(docs: str) -> None:
    names = code_variables()
    assert {"GENQ_DATABASE_URL", "GENQ_API_KEY", "GENQ_WORKER_MEMORY_BUDGET"} <= names, "the scan found too little"
    missing = _missing(names, docs, r"\b{}\b")
    assert not missing, f"GENQ_ variables the code reads but docs/ does not name: {missing}"


# --- routes ------------------------------------------------------------------------------------

def _walk_routes(routes: list[Any], found: set[tuple[str, str]]) -> None:
    for route in routes:
        path, methods = getattr(route, "path", None), getattr(route, "methods", None)
        if path and methods:
            found |= {(m, path) for m in methods if m in HTTP_METHODS}
        contexts = getattr(route, "effective_route_contexts", None)  # FastAPI's included routers
        if callable(contexts):
            _walk_routes(list(contexts()), found)
        _walk_routes(list(getattr(route, "routes", None) or []), found)


def app_routes(tmp_path: Path) -> set[tuple[str, str]]:
    """(method, path) of every route the app registers, with auth off so the OpenAPI routes exist."""
    from genq.services.app import create_app
    from genq.shared.config import build_settings

    settings = build_settings(database_url=f"sqlite:///{tmp_path}/genq.db", storage_url=f"file://{tmp_path}/objects",
                              broker_url="memory://", auth="off", models_file=None)
    app = create_app(settings, migrate=False, maintenance=False)
    found = {(m.upper(), path) for path, ops in app.openapi()["paths"].items() for m in ops
             if m.upper() in HTTP_METHODS}
    _walk_routes(list(app.routes), found)
    return found


def test_every_route_is_documented_with_its_method(docs: str, tmp_path: Path) -> None:
    routes = app_routes(tmp_path)
    assert ("POST", "/v1/jobs") in routes and ("GET", "/healthz") in routes, sorted(routes)
    # `GET /v1/files` must appear on its own, not only as the start of `GET /v1/files/{file_id}`.
    missing = [f"{m} {p}" for m, p in sorted(routes, key=lambda r: (r[1], r[0]))
               if not re.search(rf"\b{m} {re.escape(p)}(?![\w/{{])", docs)]
    assert not missing, f"routes of the app that docs/ does not name as `METHOD PATH`: {missing}"


# --- the command line ----------------------------------------------------------------------------

def cli_commands() -> Iterator[tuple[str, click.Command]]:
    """("genq keys create", command) for every command and group under `genq`."""
    from genq.cli import main

    def walk(group: click.Group, prefix: str) -> Iterator[tuple[str, click.Command]]:
        for name, command in group.commands.items():
            yield f"{prefix} {name}", command
            if isinstance(command, click.Group):
                yield from walk(command, f"{prefix} {name}")

    yield "genq", main
    yield from walk(main, "genq")


def _long_options(command: click.Command) -> list[str]:
    return [o for p in command.params if isinstance(p, click.Option) for o in p.opts if o.startswith("--")]


def test_every_cli_command_is_documented(docs: str) -> None:
    commands = dict(cli_commands())
    assert "genq keys create" in commands and "genq worker" in commands, sorted(commands)
    missing = _missing(set(commands), docs, r"`{}(?![\w-])")
    assert not missing, f"genq commands docs/ does not name: {missing}"


def test_every_cli_option_is_documented_with_its_command(docs: str) -> None:
    """Some line that names the command (`genq worker`) names all of its long options."""
    lines = docs.splitlines()
    undocumented = []
    for path, command in cli_commands():
        options = _long_options(command)
        if path == "genq":  # the root's own options (--version) may stand anywhere
            undocumented += [f"genq {o}" for o in _missing(set(options), docs, r"(?<![\w-]){}(?![\w-])")]
            continue
        if not options:
            continue
        naming = [line for line in lines if re.search(rf"`{re.escape(path)}(?![\w-])", line)]
        best = min((_missing(set(options), line, r"(?<![\w-]){}(?![\w-])") for line in naming),
                   key=len, default=options)
        undocumented += [f"{path} {o}" for o in best]
    assert not undocumented, f"options no line of docs/ names with their command: {undocumented}"


# --- error codes ---------------------------------------------------------------------------------

def code_error_codes() -> set[str]:
    """Every code genq writes: the catalogue (tests/unit/test_errors.py checks that the source
    writes no other)."""
    from genq.shared.errors import ErrorCode

    return {c.value for c in ErrorCode}


def test_every_error_code_is_documented(docs: str) -> None:
    codes = code_error_codes()
    known = {"invalid_request", "worker_lost", "database_unavailable", "batch_cancelled", "http_error"}
    assert known <= codes, sorted(codes)
    missing = _missing(codes, docs, r"`{}`")
    assert not missing, f"error codes the code writes but docs/ does not list: {missing}"


# --- the pages themselves ------------------------------------------------------------------------

def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_links_between_pages_resolve() -> None:
    anchors = {p: {_anchor(h) for h in re.findall(r"^#+ (.+)$", p.read_text(), re.M)} for p in _doc_files()}
    broken = []
    for page in _doc_files():
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # an outside address
            file, _, anchor = target.partition("#")
            dest = (page.parent / file).resolve() if file else page
            if not dest.exists():
                broken.append(f"{page.name}: {target}")
            elif anchor and dest.suffix == ".md" and dest in anchors and anchor not in anchors[dest]:
                broken.append(f"{page.name}: {target}")
    assert not broken, f"links that lead nowhere: {broken}"


def test_nothing_cites_the_old_contract_page() -> None:
    cited = [p for p in [*_doc_files(), ROOT / "README.md", ROOT / "deploy" / "README.md", ROOT / "docker-compose.yml",
                         ROOT / "tests" / "unit" / "test_deploy.py"] if OLD_CONTRACT in p.read_text()]
    assert not cited, f"{OLD_CONTRACT} is cited in {[str(p.relative_to(ROOT)) for p in cited]}"
