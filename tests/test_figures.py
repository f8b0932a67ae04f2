"""The documentation's figures: every PNG is what its data file draws, every data file says how
it was made, and every figure the docs show exists (and every figure is shown).

The data come from `docs/figures/make_figures.py` (slow: it runs the experiments); the PNGs are
drawn from the data alone by `docs/figures/render.py` (fast), which this test re-runs.
"""

import json
import pathlib
import re

import pytest
from scripts import load_script

matplotlib = pytest.importorskip("matplotlib")

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
IMAGES = DOCS / "images"
IMAGE_LINK = re.compile(r"!\[[^\]]*\]\(([^)\s]+\.png)\)")


render = load_script("docs/figures/render.py", "docs_render")
FIGURES = sorted(render.FIGURES)


def _pixels(path):
    import matplotlib.image

    return matplotlib.image.imread(path)


def test_at_least_five_figures():
    assert len(FIGURES) >= 5


@pytest.mark.parametrize("name", FIGURES)
def test_png_is_drawn_from_its_data(name, tmp_path):
    record = json.loads((IMAGES / f"{name}.json").read_text())
    for key in ("command", "figure_command", "date", "versions", "machine", "data"):
        assert record.get(key), f"{name}.json has no {key!r}"
    committed = IMAGES / f"{name}.png"
    drawn = render.render(name, out=tmp_path / f"{name}.png")
    if drawn.read_bytes() == committed.read_bytes():
        return
    # Another PNG encoder (Pillow, zlib) may compress the same pixels differently.
    import numpy as np

    new, old = _pixels(drawn), _pixels(committed)
    assert new.shape == old.shape, f"{name}.png: size differs, redraw: python {render.__file__}"
    if record["versions"]["matplotlib"] == matplotlib.__version__:
        assert np.array_equal(new, old), f"{name}.png is stale, redraw: python {render.__file__}"
    else:
        # Another matplotlib may antialias text differently; the data must still match.
        assert np.sqrt(np.mean((new - old) ** 2)) < 0.02, f"{name}.png differs from its data"


def test_every_linked_png_exists_and_every_figure_is_shown():
    shown = set()
    for page in DOCS.rglob("*.md"):
        for link in IMAGE_LINK.findall(page.read_text()):
            target = (page.parent / link).resolve()
            assert target.is_file(), f"{page.relative_to(ROOT)} links to a missing {link}"
            shown.add(target)
    for name in FIGURES:
        assert (IMAGES / f"{name}.png").resolve() in shown, f"no page shows {name}.png"
    for png in IMAGES.glob("*.png"):
        assert png.stem in FIGURES, f"{png.name} is not drawn by docs/figures/render.py"
