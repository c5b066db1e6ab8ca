"""The documentation stays true: every shipped config and every TOML block of the README and the docs site
validates (settings and loss terms), the generated reference pages say what the code says, and the pages
speak to users."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import tomllib

from pipeline.config import TeacherCacheConfig, load_config
from pipeline.student_config import StudentRunConfig
from pipeline.onpolicy.settings import GenerateConfig, OnPolicyConfig
from pipeline.train.terms import check_losses

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def _model(raw: dict):
    """Which command's settings a TOML document is: generate, onpolicy, teacher-cache or student."""
    if "generator" in raw:
        return GenerateConfig
    if "start" in raw:
        return OnPolicyConfig
    return TeacherCacheConfig if "teacher" in raw else StudentRunConfig


def _validate(raw: dict, where: str):
    model = _model(raw)
    cfg = model.model_validate(raw)
    students = cfg.students if model is StudentRunConfig else \
        cfg.round_student_config(1, [("x", "x", 1.0)], Path("x")).students if model is OnPolicyConfig else []
    for s in students:  # loss names and mixes are the registry's to check
        check_losses(s)
    return cfg


def test_shipped_configs_validate():
    configs = sorted((REPO / "data/configs").glob("*.toml"))
    assert len(configs) >= 6
    for path in configs:
        _validate(tomllib.loads(path.read_text()), str(path))
        load_config(_model(tomllib.loads(path.read_text())), path)


def _toml_blocks(page: Path) -> list[str]:
    return re.findall(r"```toml\n(.*?)```", page.read_text(), flags=re.S)


@pytest.mark.parametrize("page", [p for p in PAGES if _toml_blocks(p)], ids=lambda p: str(p.relative_to(REPO)))
def test_every_toml_block_of_the_docs_validates(page):
    """Each block is a whole settings document of the command it belongs to, in today's keys (a key read only
    for old files, such as `tasks`, warns, and a warning fails here)."""
    import warnings

    for block in _toml_blocks(page):
        raw = tomllib.loads(block)
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            cfg = _validate(raw, str(page))
        assert isinstance(cfg, _model(raw)) and cfg.model_dump(exclude_unset=True), block


def test_the_pages_that_show_settings_have_blocks_the_check_reads():
    """The block check reads something: the pages that teach settings hold TOML blocks it finds."""
    shown = {str(p.relative_to(REPO)): len(_toml_blocks(p)) for p in PAGES}
    assert sum(shown.values()) >= 7, shown
    for page in ("docs/students.md", "docs/onpolicy.md", "docs/data.md", "docs/classification.md",
                 "docs/cross-tokenizer.md", "docs/target-modes.md"):
        assert shown.get(page, 0) >= 1, f"{page} shows no ```toml block"


def test_a_bad_toml_block_would_be_caught():
    with pytest.raises(Exception, match="unknown loss terms"):
        _validate({"cache": "x", "output_dir": "y", "students": [{"name": "s", "from_teacher": 2,
                                                                  "losses": {"kd_sideways": 1.0}}]}, "test")


def test_the_generated_reference_is_current():
    from stages import reference

    assert reference.stale() == [], "run: python -m stages.reference"
    settings = (REPO / "docs/reference/settings.md").read_text()
    from pipeline import config, student_config

    sections = (config.TeacherConfig, config.DataConfig, config.CaptureConfig, config.OutputConfig,
                student_config.StudentRunConfig, student_config.StudentConfig, student_config.StudentArch,
                student_config.SourceConfig)
    for model in sections:  # every key is there, with its description
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description for the reference"
            assert f"`{name}`" in settings and field.description.replace("|", "\\|") in settings


def test_the_front_page_fits_and_the_pages_speak_to_users():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for link in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (REPO / link).exists(), f"README links to {link}, which does not exist"
    remarks = re.compile(r"this machine|was lent|no GPU was|this session|the issue", re.I)
    for page in PAGES:
        found = remarks.findall(page.read_text())
        assert not found, f"{page.name}: {found}"
