"""The GraphDef source (ADM's classify_image_graph_def.pb): a GraphDef written here with the real graph's
node names, carrying the TorchScript weights and a random softmax layer, must give the same features as
the TorchScript source, plus logits."""

import numpy as np
import pytest

from metrics import inception_weights
from metrics.errors import MetricsInputError
from metrics.inception import InceptionV3

tf = pytest.importorskip("tensorflow")
BATCH = 2


def const(name, value):
    node = tf.compat.v1.NodeDef(name=name, op="Const")
    node.attr["dtype"].type = tf.float32.as_datatype_enum
    node.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(np.asarray(value, np.float32)))
    return node


def write_graphdef(path, raw, softmax):
    """Const weights under the 2015 graph's scopes, and its BatchNormWithGlobalNormalization nodes."""
    graph = tf.compat.v1.GraphDef()
    for layer, r in raw.items():
        graph.node.append(const(f"{layer}/conv2d_params", r["w"]))
        graph.node.append(const(f"{layer}/batchnorm/gamma", np.full_like(r["beta"], 7.0)))  # unused
        for key, name in (("beta", "beta"), ("mean", "moving_mean"), ("var", "moving_variance")):
            graph.node.append(const(f"{layer}/batchnorm/{name}", r[key]))
        bn = tf.compat.v1.NodeDef(name=f"{layer}/batchnorm", op="BatchNormWithGlobalNormalization")
        bn.input.extend([f"{layer}/Conv2D"] + [f"{layer}/batchnorm/{n}" for n in
                                                ("moving_mean", "moving_variance", "beta", "gamma")])
        bn.attr["variance_epsilon"].f = 0.001
        bn.attr["scale_after_normalization"].b = False
        graph.node.append(bn)
    graph.node.append(const("softmax/weights", softmax))
    graph.node.append(const("softmax/biases", np.ones(1008)))  # ADM's IS ignores the bias
    path.write_bytes(graph.SerializeToString())


@pytest.fixture(scope="module")
def graphdef_path(tmp_path_factory):
    raw, _ = inception_weights.read_torchscript(inception_weights.default_torchscript_path())
    softmax = np.random.default_rng(0).normal(0, 0.05, (2048, 1008)).astype(np.float32)
    path = tmp_path_factory.mktemp("graph") / "classify_image_graph_def.pb"
    write_graphdef(path, raw, softmax)
    return path, softmax


@pytest.mark.slow
def test_graphdef_and_torchscript_give_the_same_features(graphdef_path):
    path, softmax = graphdef_path
    g = InceptionV3.load("graphdef", str(path))
    t = InceptionV3.load("torchscript")
    assert g.has_logits and not t.has_logits
    assert g.weights_sha256 == t.weights_sha256  # same network: references built by one serve the other
    images = np.random.default_rng(1).integers(0, 256, (3, 48, 48, 3), dtype=np.uint8)
    fg, ft = g.features(images, batch_size=BATCH), t.features(images, batch_size=BATCH)
    for k in ("pool_3", "spatial"):
        np.testing.assert_allclose(fg[k], ft[k], rtol=1e-6, atol=1e-6)
    assert ft["logits"] is None and fg["logits"].shape == (3, 1008)
    expected = fg["pool_3"].astype(np.float64) @ softmax.astype(np.float64)  # no bias, as ADM
    assert np.max(np.abs(fg["logits"] - expected)) / np.max(np.abs(expected)) < 1e-5


def test_graphdef_missing_node_or_garbage_is_named(tmp_path):
    partial = tf.compat.v1.GraphDef()
    partial.node.append(const("conv/conv2d_params", np.zeros((3, 3, 3, 32))))
    (tmp_path / "partial.pb").write_bytes(partial.SerializeToString())
    with pytest.raises(MetricsInputError, match=r"partial.pb: GraphDef has no Const node 'conv/batchnorm/beta'"):
        InceptionV3.load("graphdef", str(tmp_path / "partial.pb"))
    (tmp_path / "junk.pb").write_bytes(b"\xff\xff\xff not a protobuf")
    with pytest.raises(MetricsInputError, match="junk.pb: not a TF GraphDef"):
        InceptionV3.load("graphdef", str(tmp_path / "junk.pb"))


def test_nan_weights_are_rejected(tmp_path):
    raw, _ = inception_weights.read_torchscript(inception_weights.default_torchscript_path())
    raw["mixed_6/conv"]["var"] = np.full_like(raw["mixed_6/conv"]["var"], np.nan)
    with pytest.raises(MetricsInputError, match="layer mixed_6/conv has non-finite weights"):
        inception_weights.fold(raw, tmp_path / "w.pb")
