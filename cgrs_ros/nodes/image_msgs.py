"""sensor_msgs/Image and CompressedImage to PIL images and back, without cv_bridge.

cv_bridge does not exist on this machine (and PyPI's ``cv-bridge`` is ROS 1), so the nodes
decode images with numpy and Pillow. A malformed message raises ValueError with one sentence
naming what is wrong (size mismatch, unknown encoding, undecodable bytes), which the nodes turn
into an error result or a diagnostics line instead of an exception in the executor.

Raw encodings (sensor_msgs/image_encodings): rgb8, bgr8, rgba8, bgra8, mono8, and the 16-bit
mono16, rgb16, bgr16 (reduced to 8 bits; ``is_bigendian`` picks the byte order). Rows may be
padded (``step`` larger than ``width * bytes per pixel``). Compressed: whatever Pillow reads
(jpeg, png, ...), ``format`` is informational as in image_transport.
"""

import io

import numpy as np
from PIL import Image
from sensor_msgs.msg import CompressedImage
from sensor_msgs.msg import Image as ImageMsg

# encoding -> (channels, bytes per channel, channel order to make RGB(A), PIL mode)
_ENCODINGS = {
    'rgb8': (3, 1, (0, 1, 2), 'RGB'),
    'bgr8': (3, 1, (2, 1, 0), 'RGB'),
    'rgba8': (4, 1, (0, 1, 2, 3), 'RGBA'),
    'bgra8': (4, 1, (2, 1, 0, 3), 'RGBA'),
    'mono8': (1, 1, (0,), 'L'),
    '8uc1': (1, 1, (0,), 'L'),
    '8uc3': (3, 1, (2, 1, 0), 'RGB'),     # OpenCV's default channel order is BGR
    'mono16': (1, 2, (0,), 'L'),
    '16uc1': (1, 2, (0,), 'L'),
    'rgb16': (3, 2, (0, 1, 2), 'RGB'),
    'bgr16': (3, 2, (2, 1, 0), 'RGB'),
}
ENCODINGS = ('rgb8', 'bgr8', 'rgba8', 'bgra8', 'mono8', 'mono16', 'rgb16', 'bgr16')
# Larger images are refused before decoding (a decompression bomb, or a 100 MP frame that
# would stall a node for seconds); nodes pass their own limit.
DEFAULT_MAX_PIXELS = 40_000_000


def _check_size(width, height, max_pixels):
    if width <= 0 or height <= 0:
        raise ValueError(f'the image is {width}x{height} pixels; width and height must be '
                         'positive')
    if max_pixels and width * height > max_pixels:
        raise ValueError(f'the image is {width}x{height} = {width * height} pixels, more than '
                         f'the limit of {max_pixels}; send a smaller image')


def image_msg_to_pil(msg, max_pixels=DEFAULT_MAX_PIXELS):
    """Return the RGB (or L for mono) PIL image of a sensor_msgs/Image; ValueError if malformed.

    Alpha is dropped (RGBA -> RGB), 16-bit channels keep their top 8 bits.
    """
    encoding = msg.encoding.strip().lower()
    layout = _ENCODINGS.get(encoding)
    if layout is None:
        raise ValueError(f'unknown image encoding {msg.encoding!r}; send one of '
                         f'{", ".join(ENCODINGS)} (or a CompressedImage)')
    channels, depth, order, mode = layout
    width, height, step = int(msg.width), int(msg.height), int(msg.step)
    _check_size(width, height, max_pixels)
    row_bytes = width * channels * depth
    if step < row_bytes:
        raise ValueError(f'step {step} is smaller than a {encoding} row of {width} pixels '
                         f'({row_bytes} bytes)')
    data = np.frombuffer(memoryview(msg.data).cast('B'), dtype=np.uint8)
    if data.size != step * height:
        raise ValueError(f'image data holds {data.size} bytes, but height {height} x step '
                         f'{step} needs {step * height} ({width}x{height} {encoding})')
    rows = data.reshape(height, step)[:, :row_bytes]
    if depth == 2:
        dtype = np.dtype('>u2') if msg.is_bigendian else np.dtype('<u2')
        pixels = (rows.copy().view(dtype).reshape(height, width, channels) >> 8).astype(np.uint8)
    else:
        pixels = rows.reshape(height, width, channels)
    pixels = np.ascontiguousarray(pixels[:, :, list(order)])
    if channels == 1:
        return Image.fromarray(pixels[:, :, 0], 'L')
    image = Image.fromarray(pixels, mode)
    return image.convert('RGB') if mode == 'RGBA' else image


def compressed_msg_to_pil(msg, max_pixels=DEFAULT_MAX_PIXELS):
    """Return the RGB PIL image of a sensor_msgs/CompressedImage; ValueError if undecodable."""
    data = bytes(memoryview(msg.data).cast('B'))
    if not data:
        raise ValueError('the compressed image holds no data')
    label = msg.format.strip() or 'unnamed format'
    try:
        image = Image.open(io.BytesIO(data))
        _check_size(*image.size, max_pixels)  # from the header, before decoding the pixels
        image.load()
    except ValueError:
        raise
    except Exception as exc:  # PIL raises many types for truncated or foreign bytes
        raise ValueError(f'the compressed image ({label}, {len(data)} bytes) could not be '
                         f'decoded: {type(exc).__name__}: {exc}') from None
    return image if image.mode in ('RGB', 'L') else image.convert('RGB')


def msg_to_pil(msg, max_pixels=DEFAULT_MAX_PIXELS):
    """Return the PIL image of an Image or CompressedImage message (ValueError if malformed)."""
    if isinstance(msg, CompressedImage):
        return compressed_msg_to_pil(msg, max_pixels)
    return image_msg_to_pil(msg, max_pixels)


def describe(msg):
    """Return a short label of an image message for logs and results, e.g. ``256x256 rgb8``."""
    if isinstance(msg, CompressedImage):
        return f'{msg.format.strip() or "compressed"}, {len(msg.data)} bytes'
    return f'{msg.width}x{msg.height} {msg.encoding}'


def pil_to_image_msg(image, stamp=None, frame_id=''):
    """Return a sensor_msgs/Image rgb8 (mono8 for an L image) of a PIL image, rows unpadded."""
    if image.mode not in ('RGB', 'L'):
        image = image.convert('RGB')
    pixels = np.ascontiguousarray(np.asarray(image, dtype=np.uint8))
    msg = ImageMsg(height=image.height, width=image.width,
                   encoding='mono8' if image.mode == 'L' else 'rgb8', is_bigendian=0,
                   step=image.width * (1 if image.mode == 'L' else 3))
    msg.data = pixels.tobytes()
    if stamp is not None:
        msg.header.stamp = stamp
    msg.header.frame_id = frame_id
    return msg


def pil_to_compressed_msg(image, fmt='jpeg', quality=90, stamp=None, frame_id=''):
    """Return a sensor_msgs/CompressedImage (``jpeg`` or ``png``) of a PIL image."""
    fmt = fmt.lower()
    if fmt not in ('jpeg', 'png'):
        raise ValueError(f'compressed format {fmt!r} is not jpeg or png')
    buffer = io.BytesIO()
    if fmt == 'jpeg':
        image.convert('RGB').save(buffer, format='JPEG', quality=int(quality))
    else:
        image.save(buffer, format='PNG')
    msg = CompressedImage(format=fmt)
    msg.data = buffer.getvalue()
    if stamp is not None:
        msg.header.stamp = stamp
    msg.header.frame_id = frame_id
    return msg
