import json

import pytest

from clipforget.method.grid import Cell, forget_cells, resolve_grid, retain_cells


def test_presets():
    toy, pacs, dn = resolve_grid("toy"), resolve_grid("pacs"), resolve_grid("domainnet")
    assert len(toy.classes) == 10 and toy.domains == ("photo", "painting", "cartoon", "sketch")
    assert pacs.domains == ("photo", "art_painting", "cartoon", "sketch") and len(pacs.classes) == 7
    assert len(dn.classes) == 345 and set(dn.domains) == {"clipart", "infograph", "painting", "quickdraw",
                                                          "real", "sketch"}


def test_modes_as_cells():
    g = resolve_grid("toy")
    glob = forget_cells(g, "global", ["star"])
    assert glob == [Cell("star", d) for d in g.domains]
    dom = forget_cells(g, "domain", ["house"], ["sketch"])
    assert dom == [Cell("house", "sketch")]
    comp = forget_cells(g, "domain_complete", domains=["sketch"])
    assert comp == [Cell(c, "sketch") for c in g.classes]
    assert len(retain_cells(g, comp)) == 30 and Cell("house", "photo") in retain_cells(g, dom)


@pytest.mark.parametrize("mode,classes,domains,msg", [
    ("global", ["dragon"], [], "unknown class 'dragon'"),
    ("global", ["star"], ["sketch"], "no domains"),
    ("domain", ["star"], [], "both classes and domains"),
    ("domain", ["star"], ["pastel"], "unknown domain 'pastel'"),
    ("domain_complete", ["star"], ["sketch"], "no classes"),
    ("everything", ["star"], [], "unknown mode"),
    ("domain_complete", [], ["photo", "painting", "cartoon", "sketch"], "nothing would be retained"),
])
def test_bad_requests_are_explained(mode, classes, domains, msg):
    with pytest.raises(ValueError, match=msg):
        forget_cells(resolve_grid("toy"), mode, classes, domains)


def test_user_grid_file(tmp_path):
    f = tmp_path / "mine.json"
    f.write_text(json.dumps({"classes": ["cat", "dog"], "domains": ["photo", "sketch"]}))
    g = resolve_grid(str(f))
    assert g.name == "mine" and len(g.cells) == 4
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="classes"):
        resolve_grid(str(bad))
    with pytest.raises(ValueError, match="unknown grid"):
        resolve_grid("nope")
