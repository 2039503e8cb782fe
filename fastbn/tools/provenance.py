"""Which code a report ran: the git commit of a checkout, for the reports that name it (gpu-check, torch-suite)."""

from __future__ import annotations

import os
import subprocess

__all__ = ["git_commit"]


def git_commit(root: os.PathLike[str] | str) -> str | None:
    """The git commit a checkout at ``root`` is on, marked if tracked files have uncommitted changes.

    None where ``root`` is no checkout (an installed wheel); ``"unknown (git
    failed)"`` where git cannot tell.  What a report names as the code it ran.
    """
    if not os.path.exists(os.path.join(root, ".git")):
        return None
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (git failed)"
    return commit + (" (with uncommitted changes)" if dirty else "")
