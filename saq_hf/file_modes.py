"""File modes: give files that safetensors wrote the mode the umask gives every other file."""

import os


def _process_umask() -> int:
    mask = os.umask(0o022)  # the only way to read the umask is to set it: put it straight back
    os.umask(mask)
    return mask


def follow_umask(*paths: str | os.PathLike) -> None:
    """Give ``paths`` the mode every other file gets (``0o666`` less the umask): safetensors (0.8) writes through a
    private temporary file and leaves its files at mode 600, unreadable to anyone else."""
    mode = 0o666 & ~_process_umask()
    for path in paths:
        os.chmod(path, mode)
