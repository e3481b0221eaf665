"""The console script's launcher (``jaxcryo_main``): the malloc tunables' re-execution conditions, and that the
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


REUSE = ":".join(jaxcryo_main.HEAP_REUSE_TUNABLES)
HUGE = jaxcryo_main.HUGETLB_TUNABLE


def test_tunables_added_once(thp):
    thp("always [madvise] never\n")
    env = jaxcryo_main.hugepage_environment({"PATH": "/bin"})
    assert env["GLIBC_TUNABLES"] == f"{REUSE}:{HUGE}" and env["PATH"] == "/bin"
    assert jaxcryo_main.hugepage_environment(env) is None  # the re-executed process does not loop
    # a tunable of another glibc namespace is kept, ours appended
    env = jaxcryo_main.hugepage_environment({"GLIBC_TUNABLES": "glibc.rtld.optional_static_tls=2048"})
    assert env["GLIBC_TUNABLES"] == f"glibc.rtld.optional_static_tls=2048:{REUSE}:{HUGE}"


@pytest.mark.parametrize("mode,environ,expected", [
    ("always madvise [never]\n", {}, REUSE),                                  # THP off: heap reuse only
    ("[always] madvise never\n", {"JAXCRYO_HUGEPAGES": "0"}, REUSE),          # huge pages declined
    ("[always] madvise never\n", {"JAXCRYO_HEAP_REUSE": "0"}, HUGE),          # heap reuse declined
    ("[always] madvise never\n", {"JAXCRYO_HEAP_REUSE": "0", "JAXCRYO_HUGEPAGES": "0"}, None),
    ("[always] madvise never\n", {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, None),  # the user's own choice
    ("[always] madvise never\n", {"GLIBC_TUNABLES": "glibc.malloc.arena_max=4"}, None),
])
def test_tunables_chosen(thp, mode, environ, expected):
    thp(mode)
    env = jaxcryo_main.hugepage_environment(environ)
    assert (env and env["GLIBC_TUNABLES"]) == expected


def test_tunables_old_or_no_glibc(thp, monkeypatch):
    thp("[always] madvise never\n")
    monkeypatch.setattr(jaxcryo_main, "_glibc_version", lambda: (2, 34))  # no hugetlb tunable before 2.35
    assert jaxcryo_main.hugepage_environment({})["GLIBC_TUNABLES"] == REUSE
    monkeypatch.setattr(jaxcryo_main, "_glibc_version", lambda: None)  # musl or unknown
    assert jaxcryo_main.hugepage_environment({}) is None
    monkeypatch.setattr(jaxcryo_main.sys, "platform", "darwin")
    assert jaxcryo_main.malloc_tunables({}) == []


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
    env = {k: v for k, v in os.environ.items()
           if k not in ("JAXCRYO_HUGEPAGES", "JAXCRYO_HEAP_REUSE", "GLIBC_TUNABLES")}
    r = subprocess.run([sys.executable, str(probe), "probe", "x"], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    expected = ":".join(jaxcryo_main.malloc_tunables(env))
    assert r.stdout.strip() == f"{expected!r} ['probe', 'x']"
    env["JAXCRYO_HUGEPAGES"] = env["JAXCRYO_HEAP_REUSE"] = "0"
    r = subprocess.run([sys.executable, str(probe), "probe"], capture_output=True, text=True, env=env, timeout=120)
    assert r.stdout.strip() == "'' ['probe']"
