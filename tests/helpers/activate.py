"""Start a command as systemd's socket activation would (sd_listen_fds(3)): the descriptors
given become 3, 4, ... and LISTEN_PID, LISTEN_FDS and LISTEN_FDNAMES say so. Run as a script:

    python activate.py FD[=NAME] [FD[=NAME] ...] -- COMMAND [ARGS...]

It execs COMMAND in its own process, so LISTEN_PID is COMMAND's pid, as systemd sets it."""

from __future__ import annotations

import fcntl
import os
import sys

FIRST_FD = 3


def main(argv: list[str]) -> None:
    split = argv.index("--")
    specs, command = argv[:split], argv[split + 1 :]
    fds, names = [], []
    for spec in specs:
        number, _, name = spec.partition("=")
        fds.append(int(number))
        names.append(name)
    # Above every target first, so that moving one to 3 + i cannot overwrite another.
    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD, FIRST_FD + len(fds)) for fd in fds]
    for index, spare in enumerate(moved):
        os.dup2(spare, FIRST_FD + index, inheritable=True)
        os.close(spare)
    if not fds:  # nothing to pass: started as without systemd
        os.execvp(command[0], command)
    os.environ["LISTEN_PID"] = str(os.getpid())
    os.environ["LISTEN_FDS"] = str(len(fds))
    if any(names):
        os.environ["LISTEN_FDNAMES"] = ":".join(names)
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
