"""vzdump hook scripts, run for real as small shell scripts."""

import os
import stat
import time

import pytest

from guestvault_engine.errors import ConfigError, HookFailed
from guestvault_engine.run.hooks import GUEST_PHASES, JOB_PHASES, HookScript

RECORDER = """\
#!/bin/sh
# Record how we were called: one argument per line, then the hook variables.
{
  for arg in "$@"; do echo "arg=$arg"; done
  for var in STOREID DUMPDIR VMTYPE HOSTNAME TARGET LOGFILE INHERITED; do
    eval "isset=\\${$var+x}"
    if [ -n "$isset" ]; then eval "echo \\"$var=\\$$var\\""; fi
  done
} > "@RECORD@"
"""


def make_script(tmp_path, body, name="hook.sh"):
    path = tmp_path / name
    path.write_text(body)
    path.chmod(0o755)
    return str(path)


def recorded(tmp_path):
    return (tmp_path / "record").read_text().splitlines()


@pytest.fixture
def recorder(tmp_path):
    return HookScript(make_script(tmp_path, RECORDER.replace("@RECORD@",
                                                             str(tmp_path / "record"))))


def test_guest_phase_gets_phase_mode_and_vmid(recorder, tmp_path):
    recorder.run("backup-start", mode="snapshot", vmid=105)
    assert recorded(tmp_path) == ["arg=backup-start", "arg=snapshot", "arg=105"]


@pytest.mark.parametrize("phase", GUEST_PHASES)
def test_every_guest_phase_passes_mode_and_vmid(recorder, tmp_path, phase):
    recorder.run(phase, mode="stop", vmid=100)
    assert recorded(tmp_path) == [f"arg={phase}", "arg=stop", "arg=100"]


@pytest.mark.parametrize("phase", JOB_PHASES)
def test_job_phases_get_only_the_phase(recorder, tmp_path, phase):
    recorder.run(phase)
    assert recorded(tmp_path) == [f"arg={phase}"]


def test_phases_are_exactly_vzdumps():
    assert set(JOB_PHASES) == {"job-init", "job-start", "job-end", "job-abort"}
    assert set(GUEST_PHASES) == {"backup-start", "pre-stop", "pre-restart", "post-restart",
                                 "backup-end", "backup-abort", "log-end"}


def test_given_environment_is_passed_and_none_values_are_left_unset(recorder, tmp_path):
    recorder.run("backup-end", mode="snapshot", vmid=105, env={
        "STOREID": "local", "DUMPDIR": "/srv/backup", "VMTYPE": "qemu", "HOSTNAME": "mail",
        "TARGET": "/srv/backup/vm/105/2024-01-01T00:00:00Z", "LOGFILE": None})
    assert recorded(tmp_path)[3:] == [
        "STOREID=local", "DUMPDIR=/srv/backup", "VMTYPE=qemu", "HOSTNAME=mail",
        "TARGET=/srv/backup/vm/105/2024-01-01T00:00:00Z"]


def test_the_callers_environment_does_not_reach_the_hook_only_path_and_hook_variables(
        tmp_path, monkeypatch):
    """A hook sees PATH and vzdump's variables, never the caller's secrets or ANSIBLE_*."""
    monkeypatch.setenv("FOO_SECRET", "hunter2")
    monkeypatch.setenv("ANSIBLE_CONFIG", "/etc/ansible/ansible.cfg")
    monkeypatch.setenv("TARGET", "/stale/from/parent")
    dump = tmp_path / "env"
    hook = HookScript(make_script(tmp_path, f"#!/bin/sh\nenv > {dump}\n"))
    hook.run("job-start", env={"STOREID": "local", "DUMPDIR": None})
    seen = dict(line.split("=", 1) for line in dump.read_text().splitlines())
    # The shell adds its own PWD (and dash nothing else); everything else came from the engine.
    assert set(seen) - {"PWD"} == {"PATH", "STOREID"}
    assert seen["STOREID"] == "local" and seen["PATH"] == os.environ["PATH"]


def test_output_lines_go_to_log_in_order_and_are_returned(tmp_path):
    hook = HookScript(make_script(tmp_path, "#!/bin/sh\necho one\necho two >&2\necho three\n"))
    logged = []
    output = hook.run("job-start", log=logged.append)
    assert logged == ["one", "two", "three"]
    assert output == logged


def test_log_receives_lines_while_the_script_still_runs(tmp_path):
    go = tmp_path / "go"
    hook = HookScript(make_script(
        tmp_path, f"#!/bin/sh\necho started\nwhile [ ! -e {go} ]; do sleep 0.05; done\necho done\n"))
    seen = []

    def log(line):
        seen.append(line)
        if line == "started":
            go.touch()  # the script only finishes after it has been heard

    hook.run("job-start", log=log, timeout=30)
    assert seen == ["started", "done"]


def test_nonzero_exit_names_phase_exit_code_and_last_lines(tmp_path):
    body = "#!/bin/sh\nfor i in 1 2 3 4 5 6 7; do echo line$i; done\necho 'disk full' >&2\nexit 3\n"
    hook = HookScript(make_script(tmp_path, body))
    with pytest.raises(HookFailed) as err:
        hook.run("backup-start", mode="stop", vmid=105)
    message = str(err.value)
    assert "backup-start" in message and "exit code 3" in message
    assert "disk full" in message and "line7" in message
    assert "line1" not in message


def test_failure_without_output_says_so(tmp_path):
    hook = HookScript(make_script(tmp_path, "#!/bin/sh\nexit 1\n"))
    with pytest.raises(HookFailed, match="job-init with exit code 1 \\(no output\\)"):
        hook.run("job-init")


def test_timeout_kills_the_script_and_its_children(tmp_path):
    marker = tmp_path / "child-survived"
    body = f"#!/bin/sh\necho waiting\n(sleep 1; touch {marker}) &\nsleep 60\n"
    hook = HookScript(make_script(tmp_path, body))
    started = time.monotonic()
    with pytest.raises(HookFailed) as err:
        hook.run("job-start", timeout=0.5)
    assert time.monotonic() - started < 10
    message = str(err.value)
    assert "job-start" in message and "0.5 seconds" in message and "waiting" in message
    time.sleep(1.5)
    assert not marker.exists()


def test_script_killed_by_a_signal_is_reported(tmp_path):
    hook = HookScript(make_script(tmp_path, "#!/bin/sh\nkill -TERM $$\n"))
    with pytest.raises(HookFailed, match="killed by signal 15 in phase job-end"):
        hook.run("job-end")


def test_unknown_phase_is_a_value_error(recorder):
    with pytest.raises(ValueError, match="backup-done"):
        recorder.run("backup-done", mode="stop", vmid=100)


def test_guest_phase_without_mode_or_vmid_is_a_value_error(recorder):
    with pytest.raises(ValueError):
        recorder.run("backup-start", vmid=100)
    with pytest.raises(ValueError):
        recorder.run("backup-start", mode="pause", vmid=100)
    with pytest.raises(ValueError):
        recorder.run("backup-start", mode="stop")


def test_job_phase_with_a_vmid_is_a_value_error(recorder):
    with pytest.raises(ValueError):
        recorder.run("job-start", vmid=100)


def test_missing_script_is_reported_at_construction(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        HookScript(str(tmp_path / "nope.sh"))


def test_non_executable_script_says_to_chmod(tmp_path):
    path = tmp_path / "hook.sh"
    path.write_text("#!/bin/sh\n")
    path.chmod(stat.S_IRUSR | stat.S_IWUSR)
    if os.access(str(path), os.X_OK):
        pytest.skip("running as a user for whom every file is executable")
    with pytest.raises(ConfigError, match=f"chmod \\+x {path}"):
        HookScript(str(path))


def test_a_directory_is_not_a_hook_script(tmp_path):
    with pytest.raises(ConfigError, match="not a regular file"):
        HookScript(str(tmp_path))


def test_relative_script_path_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="absolute"):
        HookScript("hook.sh")


def test_script_that_cannot_be_executed_is_reported_as_hook_failure(tmp_path):
    hook = HookScript(make_script(tmp_path, "#!/nonexistent/interpreter\n"))
    with pytest.raises(HookFailed, match="could not be started in phase job-init"):
        hook.run("job-init")
