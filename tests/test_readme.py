"""The README keeps its promises: every setting documented, the make targets it names exist."""

from __future__ import annotations

import re

from service.settings import Settings
from tests.conftest import REPO_ROOT


def test_every_setting_is_in_the_readme_table() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    documented = set(re.findall(r"^\| `(LEADSCORE_[A-Z_]+)` \|", readme, flags=re.M))
    expected = {f"LEADSCORE_{name.upper()}" for name in Settings.model_fields}
    assert documented == expected


def test_make_targets_in_readme_exist() -> None:
    makefile = (REPO_ROOT / "Makefile").read_text()
    for target in ("run", "test"):
        assert re.search(rf"^{target}:", makefile, flags=re.M), target


def test_dockerfile_runs_the_cli_and_not_as_root() -> None:
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    assert "USER leadscore" in dockerfile
    assert 'CMD ["leadscore", "serve"]' in dockerfile
    assert "migrate" not in dockerfile.split("CMD", 1)[1]
