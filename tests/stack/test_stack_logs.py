"""Every log of the local stack is size-capped: supervisord rotates each service's and its own."""

from __future__ import annotations

import configparser
from pathlib import Path

from services.stack.settings import StackSettings
from services.stack.supervisor import LOG_BACKUPS, LOG_MAX_BYTES, PROGRAMS, render_supervisord


def test_every_log_under_the_stack_logs_folder_rotates_at_a_size(tmp_path: Path) -> None:
    settings = StackSettings(run_dir=tmp_path / "stack", repository=tmp_path / "repo")
    config = configparser.RawConfigParser()
    config.read_string(render_supervisord(settings))
    logs = (tmp_path / "stack" / "logs").resolve()
    main = config["supervisord"]
    assert Path(main["logfile"]).parent == logs
    assert main["logfile_maxbytes"] == LOG_MAX_BYTES and main["logfile_backups"] == str(LOG_BACKUPS)
    programs = [name.removeprefix("program:") for name in config if name.startswith("program:")]
    assert sorted(programs) == sorted(PROGRAMS)
    for name in programs:
        section = config[f"program:{name}"]
        assert Path(section["stdout_logfile"]) == logs / f"{name}.log"
        assert section["redirect_stderr"] == "true"  # stderr lands in the same capped file
        assert section["stdout_logfile_maxbytes"] == LOG_MAX_BYTES
        assert section["stdout_logfile_backups"] == str(LOG_BACKUPS)
    assert LOG_MAX_BYTES.endswith("MB") and 0 < int(LOG_MAX_BYTES[:-2]) <= 100 and LOG_BACKUPS >= 1
