"""Configuration: discovery, strict structuring, overrides, origins, and environments."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs
import pytest

from rulework.backends.local import LocalExecutorConfig
from rulework.backends.memory import MemoryCacheConfig
from rulework.engine.config import (
    DEFAULTS_SOURCE,
    Config,
    EnvironmentConfig,
    config_from_mapping,
    find_config_file,
    load_config,
    resolve_config,
)
from rulework.engine.errors import ConfigError
from rulework.engine.process import Process, ProcessRunner
from rulework.engine.registry import create_executors
from rulework.engine.store import MemoryBlobStore, Store


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _problems(error: pytest.ExceptionInfo[ConfigError]) -> dict[str, str]:
    return dict(error.value.problems)


# --- defaults -----------------------------------------------------------------------------------


def test_defaults_without_any_file(tmp_path: Path) -> None:
    config = load_config(cwd=tmp_path, environ={})
    assert config.source == DEFAULTS_SOURCE
    assert config.cache.dir == Path(platformdirs.user_cache_dir("rulework"))
    assert (config.cache.local, config.cache.remote, config.cache.salt) == ("sqlite", "none", "")
    assert config.execution.default_environment == "local"
    local = config.environment()
    assert (local.name, local.kind) == ("local", "local")
    assert isinstance(local.settings, LocalExecutorConfig)
    assert local.settings.parallelism == os.cpu_count()
    assert "sqlite" in config.cache.backends
    assert config == Config(cache=config.cache)


def test_the_test_suite_cache_dir_comes_from_the_environment(
    tmp_path: Path, _isolated_cache_dir: Path
) -> None:
    config = load_config(cwd=tmp_path)
    assert config.cache.dir == _isolated_cache_dir
    assert config.origin("cache.dir") == "env RULEWORK_CACHE_DIR"


# --- discovery ----------------------------------------------------------------------------------


def test_rulework_toml_is_found_from_a_subdirectory(tmp_path: Path) -> None:
    file = _write(tmp_path / "rulework.toml", '[cache]\nlocal = "memory"\n')
    deep = tmp_path / "a" / "b"
    deep.mkdir(parents=True)
    config = load_config(cwd=deep, environ={})
    assert config.source == str(file) and config.cache.local == "memory"
    assert config.origin("cache.local") == str(file)
    assert config.origin("cache.remote") == "default"


def test_pyproject_tool_rulework_is_read(tmp_path: Path) -> None:
    _write(
        tmp_path / "pyproject.toml", '[project]\nname = "x"\n\n[tool.rulework.cache]\nsalt = "s"\n'
    )
    config = load_config(cwd=tmp_path, environ={})
    assert config.cache.salt == "s"
    assert config.origin("cache.salt").endswith("pyproject.toml [tool.rulework]")


def test_pyproject_without_the_table_is_skipped(tmp_path: Path) -> None:
    _write(tmp_path / "rulework.toml", '[cache]\nsalt = "outer"\n')
    _write(tmp_path / "inner" / "pyproject.toml", '[project]\nname = "inner"\n')
    assert load_config(cwd=tmp_path / "inner", environ={}).cache.salt == "outer"


def test_rulework_toml_wins_over_pyproject_in_one_directory(tmp_path: Path) -> None:
    _write(tmp_path / "pyproject.toml", '[tool.rulework.cache]\nsalt = "pyproject"\n')
    _write(tmp_path / "rulework.toml", '[cache]\nsalt = "rulework"\n')
    assert find_config_file(tmp_path) == tmp_path / "rulework.toml"
    assert load_config(cwd=tmp_path, environ={}).cache.salt == "rulework"


def test_explicit_path_and_rulework_config_variable(tmp_path: Path) -> None:
    file = _write(tmp_path / "conf" / "custom.toml", '[cache]\nsalt = "explicit"\n')
    assert load_config(file, environ={}).cache.salt == "explicit"
    config = load_config(cwd=tmp_path, environ={"RULEWORK_CONFIG": str(file)})
    assert config.cache.salt == "explicit" and config.source == str(file)


def test_missing_or_broken_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist") as info:
        load_config(tmp_path / "nope.toml", environ={})
    assert info.value.source == str(tmp_path / "nope.toml")
    bad = _write(tmp_path / "bad.toml", "[cache\nlocal = 1\n")
    with pytest.raises(ConfigError, match=r"not valid TOML.*line 1") as info:
        load_config(bad, environ={})
    assert str(bad) in str(info.value)
    pyproject = _write(tmp_path / "p" / "pyproject.toml", '[project]\nname = "x"\n')
    with pytest.raises(ConfigError, match=r"no \[tool.rulework\] table"):
        load_config(pyproject, environ={})


# --- strictness ---------------------------------------------------------------------------------


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    file = _write(
        tmp_path / "rulework.toml",
        """
unknown_top = 1

[cache]
local = "memroy"
remte = "s3"
salt = 5

[cache.memory]
max_bytes = -1

[cache.redis]
url = "x"

[execution]
default_environment = "bldr"

[environments.local]
parallelism = "8"
keep_sandboxes = "sometimes"
inherit_env = "HOME"
paralelism = 3

[environments.typo]
kind = "lokal"

[environments.kindless]
parallelism = 2

[environments.listy]
kind = "local"
inherit_env = ["A", 3]
sandbox_root = 7
""",
    )
    with pytest.raises(ConfigError) as info:
        load_config(cwd=tmp_path, environ={})
    problems = _problems(info)
    assert info.value.source == str(file)
    expected = {
        "unknown_top": "unknown key",
        "cache.local": "did you mean 'memory'?",
        "cache.remte": "did you mean 'remote'?",
        "cache.salt": "expected a string, found integer 5",
        "cache.memory.max_bytes": "positive integer",
        "cache.redis": "unknown cache backend 'redis'",
        "execution.default_environment": "no environment named 'bldr'",
        "environments.local.parallelism": "expected an integer, found string '8'",
        "environments.local.keep_sandboxes": '"never", "on_failure", "always"',
        "environments.local.inherit_env": "expected an array, found string 'HOME'",
        "environments.local.paralelism": "did you mean 'parallelism'?",
        "environments.typo.kind": "did you mean 'local'?",
        "environments.kindless.kind": "missing required key",
        "environments.listy.inherit_env.1": "expected a string, found integer 3",
        "environments.listy.sandbox_root": "expected a path",
    }
    for path, fragment in expected.items():
        assert path in problems, f"no problem reported at {path}: {problems}"
        assert fragment in problems[path], (path, problems[path])
    assert len(problems) == len(expected)
    rendered = str(info.value)
    assert str(file) in rendered
    assert "@ environments.local.paralelism" in rendered


def test_unknown_kind_lists_the_installed_executors(tmp_path: Path) -> None:
    _write(tmp_path / "rulework.toml", '[environments.x]\nkind = "quantum"\n')
    with pytest.raises(ConfigError) as info:
        load_config(cwd=tmp_path, environ={})
    message = _problems(info)["environments.x.kind"]
    assert "'quantum'" in message
    for kind in ("container", "local", "ssh"):
        assert kind in message


def test_wrong_table_types(tmp_path: Path) -> None:
    _write(tmp_path / "rulework.toml", 'cache = "sqlite"\nexecution = 3\nenvironments = []\n')
    with pytest.raises(ConfigError) as info:
        load_config(cwd=tmp_path, environ={})
    problems = _problems(info)
    assert set(problems) == {"cache", "execution", "environments"}
    assert all("expected a table" in message for message in problems.values())


def test_no_coercion_of_booleans_into_numbers(tmp_path: Path) -> None:
    _write(tmp_path / "rulework.toml", "[environments.local]\nparallelism = true\n")
    with pytest.raises(ConfigError, match="expected an integer, found boolean True"):
        load_config(cwd=tmp_path, environ={})


# --- values -------------------------------------------------------------------------------------


def test_paths_resolve_against_the_file(tmp_path: Path) -> None:
    _write(
        tmp_path / "rulework.toml",
        '[cache]\ndir = "build/cache"\n\n[environments.local]\nsandbox_root = "~/sandboxes"\n',
    )
    config = load_config(tmp_path / "rulework.toml", cwd="/", environ={})
    assert config.cache.dir == tmp_path / "build" / "cache"
    assert config.environment("local").settings.sandbox_root == Path.home() / "sandboxes"


def test_cache_backend_settings(tmp_path: Path) -> None:
    _write(
        tmp_path / "rulework.toml",
        '[cache]\nlocal = "memory"\n\n[cache.memory]\nmax_bytes = 1024\n',
    )
    config = load_config(cwd=tmp_path, environ={})
    assert config.cache.backends["memory"] == MemoryCacheConfig(max_bytes=1024)
    assert config.cache.settings("memory") == MemoryCacheConfig(max_bytes=1024)
    assert config.origin("cache.memory.max_bytes") == str(tmp_path / "rulework.toml")


def test_local_environment_always_exists_and_can_be_tuned(tmp_path: Path) -> None:
    _write(tmp_path / "rulework.toml", '[environments.other]\nkind = "local"\nparallelism = 1\n')
    config = load_config(cwd=tmp_path, environ={})
    assert set(config.environments) == {"local", "other"}
    _write(tmp_path / "rulework.toml", "[environments.local]\nparallelism = 3\n")
    config = load_config(cwd=tmp_path, environ={})
    assert config.environment("local") == EnvironmentConfig(
        "local", "local", LocalExecutorConfig(parallelism=3)
    )


def test_unknown_environment_lookup(tmp_path: Path) -> None:
    config = load_config(cwd=tmp_path, environ={})
    with pytest.raises(
        ConfigError, match="no environment named 'lcoal' is configured; did you mean 'local'"
    ):
        config.environment("lcoal")


# --- overrides ----------------------------------------------------------------------------------


def test_environment_variables_override_the_file(tmp_path: Path) -> None:
    _write(
        tmp_path / "rulework.toml",
        '[cache]\nlocal = "sqlite"\nsalt = "file"\n\n[environments.b]\nkind = "local"\n',
    )
    environ = {
        "RULEWORK_CACHE_DIR": "relative/cache",
        "RULEWORK_CACHE_LOCAL": "memory",
        "RULEWORK_CACHE_REMOTE": "none",
        "RULEWORK_CACHE_SALT": "env",
        "RULEWORK_EXECUTION_DEFAULT_ENVIRONMENT": "b",
        "RULEWORK_UNRELATED": "ignored",
    }
    config = load_config(cwd=tmp_path, environ=environ)
    assert config.cache.dir == tmp_path / "relative" / "cache"
    assert (config.cache.local, config.cache.salt) == ("memory", "env")
    assert config.execution.default_environment == "b"
    assert config.origin("cache.salt") == "env RULEWORK_CACHE_SALT"


def test_unknown_rulework_cache_variable_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(cwd=tmp_path, environ={"RULEWORK_CACHE_DIRECTORY": "/x"})
    assert "did you mean 'RULEWORK_CACHE_DIR'" in _problems(info)["RULEWORK_CACHE_DIRECTORY"]


def test_overrides_win_and_are_typed(tmp_path: Path) -> None:
    _write(tmp_path / "rulework.toml", '[cache]\nsalt = "file"\n')
    config = load_config(
        cwd=tmp_path,
        environ={"RULEWORK_CACHE_SALT": "env"},
        overrides={
            "cache.salt": "cli",
            "cache.remote": "none",
            "environments.local.parallelism": "3",
            "environments.local.inherit_env": "HOME, LANG",
            "environments.local.sandbox_root": "sb",
            "environments.local.kill_grace_seconds": "0.25",
            "environments.fast.kind": "local",
            "environments.fast.keep_sandboxes": "always",
        },
    )
    assert config.cache.salt == "cli"
    assert config.origin("cache.salt") == "override cache.salt=cli"
    local = config.environment("local").settings
    assert local == LocalExecutorConfig(
        parallelism=3,
        inherit_env=("HOME", "LANG"),
        sandbox_root=tmp_path / "sb",
        kill_grace_seconds=0.25,
    )
    assert config.environment("fast").settings.keep_sandboxes == "always"
    as_list = load_config(
        cwd=tmp_path,
        environ={},
        overrides=[
            'environments.local.inherit_env=["A", "B"]',
            "environments.local.sandbox_root=none",
        ],
    )
    assert as_list.environment("local").settings.inherit_env == ("A", "B")
    assert as_list.environment("local").settings.sandbox_root is None


def test_bad_overrides(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(
            cwd=tmp_path,
            environ={"RULEWORK_CACHE_LOCAL": "memroy"},
            overrides=[
                "environments.local.parallelism=many",
                "cache.nothing=1",
                "no-equals-sign",
                "environments.local.keep_sandboxes=maybe",
            ],
        )
    problems = _problems(info)
    assert "expected an integer, found 'many'" in problems["environments.local.parallelism"]
    assert "unknown key" in problems["cache.nothing"]
    assert "key=value" in problems["no-equals-sign"]
    assert "(set by env RULEWORK_CACHE_LOCAL)" in problems["cache.local"]
    assert "set by override" in problems["environments.local.keep_sandboxes"]


# --- describe -----------------------------------------------------------------------------------


def test_describe_lists_every_value_with_its_origin(tmp_path: Path) -> None:
    file = _write(tmp_path / "rulework.toml", '[cache]\nlocal = "memory"\n')
    config = load_config(
        cwd=tmp_path,
        environ={"RULEWORK_CACHE_SALT": "pepper"},
        overrides={"environments.local.parallelism": "2"},
    )
    lines = config.describe()
    assert f'cache.local = "memory"  # {file}' in lines
    assert 'cache.salt = "pepper"  # env RULEWORK_CACHE_SALT' in lines
    assert 'cache.remote = "none"  # default' in lines
    assert (
        "environments.local.parallelism = 2  # override environments.local.parallelism=2" in lines
    )
    assert "environments.local.sandbox_root = (unset)  # default" in lines
    assert "environments.local.inherit_env = []  # default" in lines
    assert 'execution.default_environment = "local"  # default' in lines
    assert any(line.startswith("cache.memory.max_bytes = ") for line in lines)


# --- resolve_config -----------------------------------------------------------------------------


def test_resolve_config_accepts_every_form(tmp_path: Path) -> None:
    _write(tmp_path / "rulework.toml", '[cache]\nsalt = "found"\n')
    _write(tmp_path / "other.toml", '[cache]\nsalt = "named"\n')
    assert resolve_config(None, cwd=tmp_path).cache.salt == "found"
    assert resolve_config("other.toml", cwd=tmp_path).cache.salt == "named"
    assert resolve_config(tmp_path / "other.toml").cache.salt == "named"
    config = load_config(cwd=tmp_path)
    assert resolve_config(config) is config
    mapped = resolve_config({"cache": {"salt": "mapped", "dir": "rel"}}, cwd=tmp_path)
    assert mapped.cache.salt == "mapped"
    assert mapped.origin("cache.salt") == "<mapping>"
    with pytest.raises(TypeError, match="config must be"):
        resolve_config(42)
    with pytest.raises(ConfigError, match=r"cache.sallt"):
        config_from_mapping({"cache": {"sallt": "x"}})


# --- environments select where processes run ----------------------------------------------------


async def test_switching_the_default_environment_moves_execution(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RW_TEST_SITE_ALPHA", "alpha-site")
    monkeypatch.setenv("RW_TEST_SITE_BETA", "beta-site")
    _write(
        tmp_path / "rulework.toml",
        f"""
[cache]
local = "memory"

[execution]
default_environment = "alpha"

[environments.alpha]
kind = "local"
inherit_env = ["RW_TEST_SITE_ALPHA"]
sandbox_root = "{tmp_path / "alpha"}"

[environments.beta]
kind = "local"
inherit_env = ["RW_TEST_SITE_BETA"]
sandbox_root = "{tmp_path / "beta"}"
""",
    )
    # The same Process, as a rule would build it; nothing in it names an environment.
    process = Process(("sh", "-c", 'pwd; echo "${RW_TEST_SITE_ALPHA:-}${RW_TEST_SITE_BETA:-}"'))
    store = Store(MemoryBlobStore())
    seen = {}
    for overrides in ({}, {"execution.default_environment": "beta"}):
        config = load_config(cwd=tmp_path, overrides=overrides)
        async with ProcessRunner(
            create_executors(config.environments),
            config.execution.default_environment,
            store,
            None,
        ) as runner:
            result = await runner.run_checked(process)
        sandbox, site = result.stdout.decode().splitlines()
        seen[result.metadata.environment] = (Path(sandbox), site)
    assert set(seen) == {"alpha", "beta"}
    assert seen["alpha"][0].is_relative_to(tmp_path / "alpha") and seen["alpha"][1] == "alpha-site"
    assert seen["beta"][0].is_relative_to(tmp_path / "beta") and seen["beta"][1] == "beta-site"
