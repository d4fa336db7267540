"""Image decoding without cv_bridge: round trips per encoding, padding, byte order, bad messages.

Expected pixels are built independently with numpy (channel swaps, 16-bit packing) and compared
with what the decoder returns.
"""

import io

from cgrs_ros.nodes import image_msgs
import numpy as np
from PIL import Image
import pytest
from sensor_msgs.msg import CompressedImage
from sensor_msgs.msg import Image as ImageMsg


def _pixels(height=5, width=7, channels=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (height, width, channels), dtype=np.uint8)


def _raw(pixels, encoding, pad=0, bigendian=False):
    """Build an Image message from already-ordered channel bytes, with ``pad`` bytes per row."""
    height, width = pixels.shape[:2]
    rows = pixels.reshape(height, -1).view(np.uint8)
    if pad:
        rows = np.concatenate([rows, np.full((height, pad), 0xEE, np.uint8)], axis=1)
    msg = ImageMsg(height=height, width=width, encoding=encoding, is_bigendian=int(bigendian),
                   step=rows.shape[1])
    msg.data = rows.tobytes()
    return msg


@pytest.mark.parametrize('encoding, order, alpha', [
    ('rgb8', [0, 1, 2], False), ('bgr8', [2, 1, 0], False),
    ('rgba8', [0, 1, 2], True), ('bgra8', [2, 1, 0], True)])
@pytest.mark.parametrize('pad', [0, 3])
def test_colour_encodings_decode_to_rgb(encoding, order, alpha, pad):
    rgb = _pixels()
    stored = rgb[:, :, order]  # the bytes as the encoding lays them out
    if alpha:
        stored = np.concatenate([stored, np.full(rgb.shape[:2] + (1,), 77, np.uint8)], axis=2)
    image = image_msgs.image_msg_to_pil(_raw(np.ascontiguousarray(stored), encoding, pad))
    assert image.mode == 'RGB' and image.size == (7, 5)
    np.testing.assert_array_equal(np.asarray(image), rgb)


def test_mono8_with_padding_decodes_to_l():
    gray = _pixels(channels=1)[:, :, 0]
    image = image_msgs.image_msg_to_pil(_raw(gray[:, :, None], 'mono8', pad=1))
    assert image.mode == 'L'
    np.testing.assert_array_equal(np.asarray(image), gray)


@pytest.mark.parametrize('bigendian', [False, True])
def test_16_bit_encodings_keep_the_high_byte_in_either_byte_order(bigendian):
    rng = np.random.default_rng(1)
    values = rng.integers(0, 65536, (4, 6, 3), dtype=np.uint16)
    stored = values.astype('>u2' if bigendian else '<u2')
    msg = _raw(np.ascontiguousarray(stored).view(np.uint8).reshape(4, 6, 6), 'rgb16',
               pad=2, bigendian=bigendian)
    image = image_msgs.image_msg_to_pil(msg)
    np.testing.assert_array_equal(np.asarray(image), (values >> 8).astype(np.uint8))
    # The same bytes read with the wrong flag give other pixels: the flag is honoured.
    msg.is_bigendian = int(not bigendian)
    assert not np.array_equal(np.asarray(image_msgs.image_msg_to_pil(msg)), np.asarray(image))


def test_pil_to_image_msg_round_trips():
    rgb = Image.fromarray(_pixels(9, 11))
    msg = image_msgs.pil_to_image_msg(rgb, frame_id='camera')
    assert (msg.encoding, msg.width, msg.height, msg.step) == ('rgb8', 11, 9, 33)
    assert msg.header.frame_id == 'camera'
    np.testing.assert_array_equal(np.asarray(image_msgs.msg_to_pil(msg)), np.asarray(rgb))
    gray = rgb.convert('L')
    msg = image_msgs.pil_to_image_msg(gray)
    assert msg.encoding == 'mono8'
    np.testing.assert_array_equal(np.asarray(image_msgs.msg_to_pil(msg)), np.asarray(gray))


def test_compressed_png_is_lossless_and_jpeg_close():
    rgb = Image.fromarray(np.kron(_pixels(4, 4), np.ones((8, 8, 1), np.uint8)))
    png = image_msgs.pil_to_compressed_msg(rgb, 'png')
    assert png.format == 'png'
    np.testing.assert_array_equal(np.asarray(image_msgs.msg_to_pil(png)), np.asarray(rgb))
    jpeg = image_msgs.pil_to_compressed_msg(rgb, 'jpeg', quality=95)
    decoded = np.asarray(image_msgs.msg_to_pil(jpeg), dtype=np.int16)
    assert decoded.shape == (32, 32, 3)
    assert np.abs(decoded - np.asarray(rgb, dtype=np.int16)).mean() < 15.0  # lossy, chroma
    np.testing.assert_array_equal(decoded, np.asarray(Image.open(io.BytesIO(bytes(jpeg.data)))))
    # RGBA PNG (e.g. a screenshot) arrives as RGB.
    buffer = io.BytesIO()
    Image.new('RGBA', (3, 2), (1, 2, 3, 4)).save(buffer, format='PNG')
    msg = CompressedImage(format='png')
    msg.data = buffer.getvalue()
    assert image_msgs.msg_to_pil(msg).mode == 'RGB'


@pytest.mark.parametrize('change, words', [
    ({'encoding': 'yuv422_weird'}, 'unknown image encoding'),
    ({'step': 20}, 'step 20 is smaller'),
    ({'height': 6}, 'needs'),
    ({'width': 0}, 'must be positive'),
])
def test_malformed_raw_images_raise_value_error_naming_the_problem(change, words):
    msg = _raw(_pixels(), 'rgb8')
    for name, value in change.items():
        setattr(msg, name, value)
    with pytest.raises(ValueError, match=words):
        image_msgs.msg_to_pil(msg)


def test_truncated_data_names_both_sizes():
    msg = _raw(_pixels(), 'rgb8')
    msg.data = bytes(msg.data)[:-5]
    with pytest.raises(ValueError, match=r'holds 100 bytes.*needs 105'):
        image_msgs.msg_to_pil(msg)


def test_too_many_pixels_refused_before_decoding():
    msg = _raw(_pixels(), 'rgb8')
    with pytest.raises(ValueError, match='more than the limit of 20'):
        image_msgs.msg_to_pil(msg, max_pixels=20)
    png = image_msgs.pil_to_compressed_msg(Image.new('RGB', (64, 64)), 'png')
    with pytest.raises(ValueError, match='4096 pixels'):
        image_msgs.msg_to_pil(png, max_pixels=1000)


@pytest.mark.parametrize('data', [b'', b'not an image at all', None])
def test_undecodable_compressed_images_raise_value_error(data):
    msg = CompressedImage(format='jpeg')
    if data is None:  # a JPEG cut in half
        data = bytes(image_msgs.pil_to_compressed_msg(Image.new('RGB', (64, 64)), 'jpeg').data)
        data = data[:len(data) // 2]
    msg.data = data
    with pytest.raises(ValueError, match='compressed image'):
        image_msgs.msg_to_pil(msg)
