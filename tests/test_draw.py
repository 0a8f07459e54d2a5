"""fxopt.draw: a well-formed SVG (or HTML page) naming each rewritten region, what it was and became."""

from __future__ import annotations

import inspect
import re
import xml.etree.ElementTree as ET

import pytest
import torch
import torch.nn as nn

import fxopt
from fxopt.draw import _canonical_graph, _label, diff_graphs
from fxopt.examples import randomize_batch_norms

from lora_models import ResidualAdapter
from reparam_blocks import Net, RepVGGBlock, randomise_bn

SVG = "{http://www.w3.org/2000/svg}"


def conv_bn_dropout() -> nn.Module:
    return randomize_batch_norms(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.1), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
    ).eval()


def legend(path) -> list[str]:
    """The region summaries, read back from the SVG (each wrapped line carries the whole one)."""
    root = ET.parse(path).getroot()
    assert root.tag == f"{SVG}svg"
    summaries = [text.find(f"{SVG}title").text for text in root.iter(f"{SVG}text") if text.get("class") == "legend"]
    return list(dict.fromkeys(summaries))


def test_svg_names_each_fold_and_the_removed_dropout(tmp_path):
    torch.manual_seed(0)
    model, x = conv_bn_dropout(), torch.randn(1, 3, 12, 12)
    optimized = fxopt.optimize(model, (x,), verify=False)
    path = fxopt.draw(model, optimized, tmp_path / "graph.svg")
    assert legend(path) == [
        "region 1 was: conv 0, batch_norm 1; became: conv 0",
        "region 2 was: dropout; became: nothing (removed)",
        "region 3 was: conv 4, batch_norm 5; became: conv 4",
    ]
    # the unchanged ReLU is drawn on both sides, a replaced BatchNorm on the before side only
    root = ET.parse(path).getroot()
    node_labels = [g.find(f"{SVG}text").text for g in root.iter(f"{SVG}g") if g.get("class") == "node"]
    assert node_labels.count("ReLU 2") == 2 and node_labels.count("batch_norm 1") == 1


def test_branch_merging_is_one_region_per_block(tmp_path):
    torch.manual_seed(0)
    model, x = randomise_bn(Net(RepVGGBlock(3, 8, stride=2), RepVGGBlock(8, 8))), torch.randn(1, 3, 8, 8)
    optimized = fxopt.optimize(model, (x,), verify=False)
    diff = diff_graphs(_canonical_graph(model, None), _canonical_graph(optimized, None))
    assert len(diff.regions) == 2
    second = diff.regions[1]
    assert [n.target.__name__ for n in second.after] == ["conv"]
    assert sum(n.name.startswith("add") for n in second.before) == 2  # dense + 1x1 + identity: two adds merged away
    # the ReLUs between the blocks are unchanged, drawn on one row each
    assert sum(getattr(b.target, "__name__", "") == "relu" for b in diff.matched) == 2


def test_html_lists_the_merged_adapter(tmp_path):
    torch.manual_seed(0)
    model, x = ResidualAdapter().eval(), torch.randn(2, 6)
    optimized = fxopt.optimize(model, (x,), verify=False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    page = fxopt.draw(model, optimized, tmp_path / "graph.html").read_text()
    assert "<svg" in page
    (region,) = re.findall(r"<li>region 1 was: (.*?)</li>", page)  # one region: the adapter merged into base
    was, became = region.split("; became: ")
    assert all(f"linear {layer}" in was for layer in ("base", "lora_A", "lora_B")), region
    assert "linear base" in became and "lora" not in became, region
    torch.testing.assert_close(model.state_dict(), state)  # drawing changes neither model
    torch.testing.assert_close(optimized(x), model(x))


def test_identical_graphs_have_no_regions(tmp_path):
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU()).eval()
    path = fxopt.draw(model, fxopt.optimize(model, (torch.randn(1, 3),), verify=False), tmp_path / "same.svg")
    assert legend(path) == ["no rewritten regions: the graphs are the same"]


def test_a_model_that_keeps_its_class_shows_each_block_become_one_conv(tmp_path):
    if "keep_class" not in inspect.signature(fxopt.optimize).parameters:
        pytest.skip("fxopt.optimize has no keep_class yet")
    torch.manual_seed(0)
    model, x = randomise_bn(Net(RepVGGBlock(3, 8, stride=2), RepVGGBlock(8, 8))), torch.randn(1, 3, 8, 8)
    kept = fxopt.optimize(model, (x,), verify=False, keep_class=True)
    diff = diff_graphs(_canonical_graph(model, None), _canonical_graph(kept, None))
    # the blocks' parameters now live under new names (blocks.0.weight): the regions still pair up
    assert [[_label(n) for n in region.after] for region in diff.regions] == [["conv blocks.0"], ["conv blocks.1"]]
    assert all(len(region.before) >= 5 for region in diff.regions)
    assert ET.parse(fxopt.draw(model, kept, tmp_path / "kept.svg")).getroot().tag == f"{SVG}svg"
