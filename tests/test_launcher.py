"""The console script's launcher (``jaxcryo_main``): the huge-page re-execution's conditions, and that the
command runs through it."""
import os
import subprocess
import sys

import pytest

import jaxcryo_main


@pytest.fixture
def thp(tmp_path, monkeypatch):
    """Point the launcher at a fake ``transparent_hugepage/enabled`` file; returns a setter."""
    path = tmp_path / "enabled"
    monkeypatch.setattr(jaxcryo_main, "_THP_ENABLED", str(path))
    monkeypatch.setattr(jaxcryo_main, "_glibc_version", lambda: (2, 36))
    monkeypatch.setattr(jaxcryo_main.sys, "platform", "linux")

    def set_mode(text):
        path.write_text(text)
    return set_mode


def test_hugepages_added_once(thp):
    thp("always [madvise] never\n")
    env = jaxcryo_main.hugepage_environment({"PATH": "/bin"})
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1" and env["PATH"] == "/bin"
    assert jaxcryo_main.hugepage_environment(env) is None  # the re-executed process does not loop
    env = jaxcryo_main.hugepage_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"


@pytest.mark.parametrize("mode,environ", [
    ("always madvise [never]\n", {}),                       # THP off: nothing to gain
    ("[always] madvise never\n", {"JAXCRYO_HUGEPAGES": "0"}),  # declined
    ("[always] madvise never\n", {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}),  # the user's own choice
])
def test_hugepages_not_added(thp, mode, environ):
    thp(mode)
    assert jaxcryo_main.hugepage_environment(environ) is None


def test_hugepages_old_glibc(thp, monkeypatch):
    thp("[always] madvise never\n")
    monkeypatch.setattr(jaxcryo_main, "_glibc_version", lambda: (2, 34))
    assert jaxcryo_main.hugepage_environment({}) is None
    monkeypatch.setattr(jaxcryo_main, "_glibc_version", lambda: None)  # musl or unknown
    assert jaxcryo_main.hugepage_environment({}) is None


def test_command_runs_through_the_launcher():
    """The re-executed command works end to end (``--help`` exits 0 and prints the subcommands)."""
    r = subprocess.run([sys.executable, "-m", "jaxcryo_main", "--help"], capture_output=True, text=True,
                       env={k: v for k, v in os.environ.items() if k != "JAXCRYO_HUGEPAGES"}, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "reconstruct" in r.stdout


def test_no_reexec_from_a_python_session(monkeypatch):
    """``main()`` called from a Python session (here pytest) never replaces the process."""
    monkeypatch.setattr(jaxcryo_main, "hugepage_environment", lambda: {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})
    called = []
    monkeypatch.setattr(jaxcryo_main.os, "execve", lambda *a: called.append(a))
    monkeypatch.setattr(jaxcryo_main.sys, "argv", ["jaxcryo", "--help"])
    with pytest.raises(SystemExit):
        jaxcryo_main.main()
    assert not called


def test_reexec_keeps_the_command_line(tmp_path):
    """The command re-executes itself with the tunable set and the same arguments (a script named like the
    console script whose subcommand runner prints its environment's tunable and its arguments)."""
    probe = tmp_path / "jaxcryo"  # the launcher treats a main file of this name as the command
    probe.write_text("import os, sys\nimport jaxcryo.cli, jaxcryo_main\n"
                     "jaxcryo.cli.console_main = lambda: print(repr(os.environ.get('GLIBC_TUNABLES', '')), sys.argv[1:]) or 0\n"
                     "sys.exit(jaxcryo_main.main())\n")
    env = {k: v for k, v in os.environ.items() if k not in ("JAXCRYO_HUGEPAGES", "GLIBC_TUNABLES")}
    r = subprocess.run([sys.executable, str(probe), "probe", "x"], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    expected = "glibc.malloc.hugetlb=1" if jaxcryo_main.hugepage_environment(env) is not None else ""
    assert r.stdout.strip() == f"{expected!r} ['probe', 'x']"
    env["JAXCRYO_HUGEPAGES"] = "0"
    r = subprocess.run([sys.executable, str(probe), "probe"], capture_output=True, text=True, env=env, timeout=120)
    assert r.stdout.strip() == "'' ['probe']"
