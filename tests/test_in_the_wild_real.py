"""Issue 13 (real networks): what running the converter on real exports and state dicts found.

ultralytics' ``Detect.fuse()`` drops the detection branch inference does not use
(``ultralytics/nn/modules/head.py`` ``Detect.fuse``, ultralytics 8.4.190): a head with a
one-to-one twin (YOLOv10's ``v10Detect``: ``cv2``/``cv3`` and ``one2one_cv2``/``one2one_cv3``)
keeps one side. The layouts are built here from that source; no PyTorch.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_io_npz_synthetic import add_bn, add_conv

from repnp import cli
from repnp.io import convert_state
from repnp.io.npz import check_state
from repnp.io.npz.schemes import SCHEMES, ultralytics_unused_head


def v10_head_state(rng):
    """``model.1`` = a v10Detect with one level: cv2 (Conv, Conv, Conv2d), cv3 (DW Conv + Conv ...,
    Conv2d), their one2one_ copies and the DFL conv; ``model.0`` a Conv before it."""
    s = {}
    add_conv(s, rng, "model.0.conv", 8, 3, 3)
    add_bn(s, rng, "model.0.bn", 8)
    for side in ("", "one2one_"):
        p = f"model.1.{side}cv2.0."
        add_conv(s, rng, f"{p}0.conv", 16, 8, 3)
        add_bn(s, rng, f"{p}0.bn", 16)
        add_conv(s, rng, f"{p}1.conv", 16, 16, 3)
        add_bn(s, rng, f"{p}1.bn", 16)
        add_conv(s, rng, f"{p}2", 64, 16, 1, bias=True)
        p = f"model.1.{side}cv3.0."
        add_conv(s, rng, f"{p}0.0.conv", 8, 1, 3)
        add_bn(s, rng, f"{p}0.0.bn", 8)
        add_conv(s, rng, f"{p}0.1.conv", 12, 8, 1)
        add_bn(s, rng, f"{p}0.1.bn", 12)
        add_conv(s, rng, f"{p}2", 80, 12, 1, bias=True)
        if not side:
            add_conv(s, rng, "model.1.dfl.conv", 1, 16, 1)
    return s


def _fused_keys(state, *, drop):
    """What ``fuse()`` leaves: every Conv's ``bn.*`` gone and ``conv.bias`` added, the ``drop`` side gone."""
    out = []
    for k in state:
        if any(f".{d}." in k for d in drop) or ".bn." in k:
            continue
        out.append(k)
        if k.endswith(".conv.weight") and "dfl" not in k:
            out.append(k[:-len("weight")] + "bias")
    return out


@pytest.mark.parametrize("scheme, drop", [("ultralytics", ("one2one_cv2", "one2one_cv3")),
                                          ("ultralytics-end2end", ("cv2", "cv3"))])
def test_ultralytics_fuse_drops_the_unused_detection_branch(scheme, drop):
    # Regression: the one2one (or, end2end, the one2many) branch was fused and kept, so the result
    # had 48 keys (yolov10n) that the fused model's state_dict() does not have.
    s = v10_head_state(np.random.default_rng(0))
    out, report = convert_state(s, scheme=scheme)
    want = _fused_keys(s, drop=drop if scheme == "ultralytics" else ("cv2", "cv3"))
    if scheme == "ultralytics-end2end":     # the one2one_ keys stay under their own names
        want = [k for k in _fused_keys(s, drop=()) if not k.startswith(("model.1.cv2.", "model.1.cv3."))]
    assert list(out) == want
    assert report.check["passed"] and report.info["dropped"]
    assert any("dropped" in m and "fuse()" in m for m in report.messages)
    assert report.counts_before["keys"] == len(s)
    check = check_state(s, out, scheme=scheme)          # the verify path drops the same keys
    assert check["passed"]


def test_ultralytics_unused_head_keys():
    keys = ["m.1.cv2.0.w", "m.1.cv2x.0.w", "m.1.one2one_cv2.0.w", "m.1.dfl.conv.weight", "m.2.cv2.w"]
    assert ultralytics_unused_head(keys) == ["m.1.one2one_cv2.0.w"]
    assert ultralytics_unused_head(keys, end2end=True) == ["m.1.cv2.0.w"]
    assert ultralytics_unused_head(["a.cv2.w", "b.conv.weight"]) == []
    assert SCHEMES["ultralytics-end2end"].eps == SCHEMES["ultralytics"].eps


def test_cli_lists_and_takes_the_end2end_scheme(capsys, tmp_path):
    s = v10_head_state(np.random.default_rng(1))
    np.savez(tmp_path / "t.npz", **s)
    code = cli.main(["convert", str(tmp_path / "t.npz"), str(tmp_path / "o.npz"), "--scheme", "ultralytics-end2end"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "model.1.cv2, model.1.cv3" in out
    written = np.load(tmp_path / "o.npz")
    assert not any(k.startswith(("model.1.cv2.", "model.1.cv3.")) for k in written.files)
    assert "model.1.one2one_cv2.0.0.conv.bias" in written.files


# --- rtdetr-l exported without constant folding: TopK's k computed from a Shape chain ---

def _k_from_shape(model):
    """``model`` with TopK's constant ``k`` replaced by ``Reshape(Min(Gather(Shape(s), 1), 1), [1])``,
    as PyTorch exports ``topk(x, min(n, x.shape[1]))`` without constant folding."""
    import onnx
    from onnx import helper, numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    keep = [t for t in g.initializer if t.name != "k"]
    del g.initializer[:]
    g.initializer.extend(keep)
    chain = [helper.make_node("Shape", ["s"], ["k_shape"]),
             helper.make_node("Constant", [], ["k_one"], value=numpy_helper.from_array(np.array(1, np.int64))),
             helper.make_node("Gather", ["k_shape", "k_one"], ["k_n"], axis=0),
             helper.make_node("Min", ["k_n", "k_one"], ["k_min"]),
             helper.make_node("Constant", [], ["k_dims"], value=numpy_helper.from_array(np.array([1], np.int64))),
             helper.make_node("Reshape", ["k_min", "k_dims"], ["k"])]
    nodes = list(g.node)
    at = next(i for i, n in enumerate(nodes) if n.op_type == "TopK")
    del g.node[:]
    g.node.extend(nodes[:at] + chain + nodes[at:])
    return out


def test_topk_check_ignores_the_shape_chain_of_k():
    # Regression: rtdetr-l (nocf export) was refused (exit 1, 0.0055): the check wanted to compare
    # TopK's k, computed from Shape, which the converter folds into an initializer, so the
    # selection-aware comparison gave up and the flipped selection failed the whole model.
    from test_converter_in_the_wild_checks import _flipping_topk

    from repnp.io import convert_onnx
    from repnp.io.onnx.check import _selection_split

    m, _ = _flipping_topk()
    m = _k_from_shape(m)
    assert _selection_split(m)[2] == ["s"]          # k is not value-dependent: not compared
    fused, report = convert_onnx(m)
    assert report.check["passed"] and report.check["max_error"] <= 1e-5
    assert report.check["not_compared"] == ["idx"]
    assert not any(n.op_type in ("Shape", "Constant") for n in fused.graph.node)


# --- FastViT: the walk's depthwise KxK -> dense 1x1 merges (refused as costlier) took minutes ---

def test_merge_pointwise_does_not_build_the_dense_first_kernel(monkeypatch):
    # Regression: merge_pointwise made the depthwise kernel dense (M, M, k, k) and multiplied
    # through its zeros: 11 G multiply-adds per FastViT stage-4 block, 2-5 minutes per
    # conversion of fastvit_t8 / fastvit_sa12 (the merge is then refused by the cost check).
    from repnp import fusion
    from repnp.fusion import sequential

    seen = []
    real = sequential.ungroup_kernel

    def spy(kernel, *, groups):
        seen.append((kernel.shape, groups))
        return real(kernel, groups=groups)

    monkeypatch.setattr(sequential, "ungroup_kernel", spy)
    rng = np.random.default_rng(0)
    m, o, k = 12, 7, 3
    dw, dw_b = rng.standard_normal((m, 1, k, k)), rng.standard_normal(m)
    q, q_b = rng.standard_normal((o, m, 1, 1)), rng.standard_normal(o)
    kernel, bias = fusion.merge_pointwise((dw, dw_b), (q, q_b), groups=m)
    assert all(shape[1:] == (m, 1, 1) for shape, _ in seen), seen      # only the 1x1 is ever ungrouped
    want = np.einsum("om,mchw->ochw", q[:, :, 0, 0], real(dw, groups=m))
    np.testing.assert_allclose(kernel, want, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(bias, q[:, :, 0, 0] @ dw_b + q_b, rtol=1e-13)
