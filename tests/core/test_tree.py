"""The block tree: children, replace_children and walk on each composite, immutable edits, unbound copies."""

from __future__ import annotations

import pytest

from diffblocks.blocks import AbstractBlock, Branch, Loop, Sequence, Switch, walk
from diffblocks.blocks.tree import copy_tree
from tests.core.test_plan import img2img_switch, toy_blocks
from tests.core.toy import Decode, Decoder, EncodeImage, Predict, PrepareLatents, SetTimesteps, Update


def shape(tree: AbstractBlock) -> list[tuple[str, str, str]]:
    return [(node.path, type(node.block).__name__, node.block.name) for node in walk(tree)]


def test_sequence_children_and_rebuild() -> None:
    seq = toy_blocks()
    assert seq.children() == seq.blocks
    assert seq.child_names() == ("set_timesteps", "prepare_latents", "denoise", "decode")
    decode = Decode(name="decode")
    rebuilt = seq.replace_children((*seq.children()[:3], decode))
    assert isinstance(rebuilt, Sequence) and rebuilt.name == "toy" and rebuilt["decode"] is decode
    assert seq["decode"] is not decode  # the original is untouched
    with pytest.raises(ValueError, match="already has a block named 'decode'"):
        seq.replace_children((decode, decode))


def test_loop_children_and_rebuild_keep_its_settings() -> None:
    loop = Loop(Predict(), name="denoise", over="sigmas", item="sigma", index="i", count="n")
    rebuilt = loop.replace_children((Predict(), Update()))
    assert rebuilt.child_names() == ("predict", "update") and loop.child_names() == ("predict",)
    settings = (rebuilt.name, rebuilt.over, rebuilt.item, rebuilt.index, rebuilt.count)
    assert settings == ("denoise", "sigmas", "sigma", "i", "n")
    assert not isinstance(loop, Sequence)  # walkers need no "a Sequence but not a Loop" guard


def test_switch_children_are_its_branches_blocks() -> None:
    switch = img2img_switch().get("start")
    assert isinstance(switch, Switch)
    assert switch.child_names() == ("img2img", "text2img")
    assert [type(child) for child in switch.children()] == [EncodeImage, PrepareLatents]
    other = PrepareLatents(name="noise")
    rebuilt = switch.replace_children((switch.children()[0], other))
    assert rebuilt.branch("text2img") == Branch("text2img", other) and rebuilt.branch("img2img").when == ("image",)
    assert isinstance(switch.workflow("text2img"), PrepareLatents) and switch.workflow("text2img") is not other
    with pytest.raises(ValueError, match="has 2 branches .* not 3"):
        switch.replace_children((other, other, other))


def test_a_leaf_has_no_children() -> None:
    leaf = Predict()
    assert leaf.children() == () and leaf.child_names() == ()
    assert leaf.replace_children(()) is leaf
    with pytest.raises(ValueError, match="is a leaf"):
        leaf.replace_children((Update(),))


def test_walk_is_depth_first_with_switch_branches_by_name() -> None:
    assert shape(img2img_switch()) == [
        ("", "Sequence", "toy"),
        ("set_timesteps", "SetTimesteps", "set_timesteps"),
        ("start", "Switch", "start"),
        ("start.img2img", "EncodeImage", "encode_image"),
        ("start.text2img", "PrepareLatents", "prepare_latents"),
        ("denoise", "Loop", "denoise"),
        ("denoise.predict", "Predict", "predict"),
        ("denoise.update", "Update", "update"),
        ("decode", "Decode", "decode"),
    ]
    nodes = {node.path: node for node in walk(img2img_switch())}
    assert nodes["denoise.update"].parent is nodes["denoise"] and nodes["denoise.update"].depth == 2
    assert nodes[""].label == "toy" and nodes["start.img2img"].key == "img2img"
    skipped = [node.path for node in walk(img2img_switch(), skip=lambda node: node.path in ("start", "denoise"))]
    assert skipped == ["", "set_timesteps", "decode"]


def test_composites_are_immutable() -> None:
    seq = toy_blocks()
    with pytest.raises(AttributeError, match="Sequence 'toy' is immutable"):
        seq.name = "other"  # type: ignore[misc]
    with pytest.raises(AttributeError, match="immutable"):
        seq.get("denoise").over = "sigmas"  # type: ignore[misc]


def test_edits_return_new_trees_sharing_what_did_not_change() -> None:
    original = img2img_switch()
    before = shape(original)
    edited = original.insert(Update(name="extra"), after="denoise.update")
    edited = edited.replace("start.text2img", SetTimesteps())
    edited = edited.remove("decode")
    assert shape(original) == before
    assert edited.get("denoise").child_names() == ("predict", "update", "extra")  # type: ignore[attr-defined]
    assert edited.get("start.text2img").name == "prepare_latents"  # a replacement takes its place's name
    assert isinstance(edited.get("start.text2img"), SetTimesteps)
    assert edited.names == ("set_timesteps", "start", "denoise")
    assert edited.get("set_timesteps") is original.get("set_timesteps")  # untouched blocks are shared, not copied
    assert edited.get("denoise") is not original.get("denoise")
    with pytest.raises(ValueError, match="blocks are added and removed inside a branch"):
        original.remove("start.text2img")
    with pytest.raises(KeyError, match="'denoise' has no block 'scale'"):
        original.insert(Update(), before="denoise.scale")
    with pytest.raises(KeyError, match="is a leaf block and has no sub-block 'x'"):
        original.get("decode.x")


def test_copy_tree_copies_every_block_and_unbinds_the_leaves() -> None:
    original = toy_blocks()
    decode = original.get("decode")
    assert isinstance(decode, Decode)
    decode.bind({"decoder": Decoder()})
    copied = copy_tree(original)
    assert shape(copied) == shape(original)
    pairs = zip(walk(copied), walk(original))
    assert all(mine.block is not theirs.block for mine, theirs in pairs)
    copy = copied.get("decode")
    assert isinstance(copy, Decode) and copy.config == decode.config
    with pytest.raises(LookupError, match="has no component 'decoder' bound"):
        _ = copy.decoder
    assert isinstance(decode.decoder, Decoder)  # the original keeps its binding


def test_unbound_copy_of_a_leaf() -> None:
    block = PrepareLatents(name="latents", channels=3).bind({"decoder": Decoder()})
    copy = block.unbound()
    assert type(copy) is PrepareLatents and copy.name == "latents" and copy.config.channels == 3
    with pytest.raises(LookupError):
        _ = copy.decoder
    renamed = block.renamed("start")
    assert renamed.name == "start" and block.name == "latents"
