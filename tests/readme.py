"""The README's shell commands, read as a user copies them: from its ```bash blocks, with the
backslash continuations joined and the trailing ``# comments`` dropped."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands(path: Path = ROOT / "README.md") -> list[str]:
    """Every command of every ```bash block of ``path``, in order."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(), re.S):
        for cmd in block.replace("\\\n", " ").splitlines():
            cmd = re.sub(r"\s+#.*$", "", cmd).strip()
            if cmd and not cmd.startswith("#"):
                out.append(re.sub(r"\s+", " ", cmd))
    return out


def readme_command(start: str) -> str:
    """The README's one command that starts with ``start`` (an error when there is none or more)."""
    found = [c for c in readme_commands() if c.startswith(start)]
    assert len(found) == 1, f"README.md: expected one command starting {start!r}, found {found}"
    return found[0]


def fresh_clone(dest: Path) -> Path:
    """A fresh clone of this repository's committed state at ``dest``, with ``.venv`` linked to
    this checkout's (what ``make`` creates in a clone) and, where this checkout has one beside it,
    ``../shared`` linked too (the README's default place for the data)."""
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(dest)], check=True, timeout=300)
    (dest / ".venv").symlink_to(ROOT / ".venv")
    if (ROOT.parent / "shared").is_dir() and not (dest.parent / "shared").exists():
        (dest.parent / "shared").symlink_to(ROOT.parent / "shared")
    return dest
