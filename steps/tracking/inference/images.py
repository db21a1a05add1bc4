"""Digit images from files: a PNG, a folder of PNGs or an ``.npy`` array, as ``predict``
and ``score`` read them. Anything that is not digit images is refused in one line naming
``images`` (a StepError): by ``predict`` before a model is loaded, by ``score`` in local
mode from inside its Spark job (the PNGs are decoded there), as the job's one-line failure.

PNGs are read as grayscale and resized to 28x28. MNIST digits are light on dark; an image
whose background is light (mean above mid-grey) is inverted, as a drawing usually is.
"""

from __future__ import annotations

import io
from pathlib import Path

from steps.tracking.runtime.cli import StepError

# A digit drawn at any sensible resolution fits; a bigger file is refused before decoding.
MAX_PNG_PIXELS = 4096 * 4096


def load_images(path: str):
    """(names, float32 array (N, 28, 28)) from a PNG, a folder of PNGs or an .npy file;
    anything that is not digit images is refused in one line naming ``images``."""
    from steps.core.pixels import to_images

    source = Path(path)
    if not source.exists():
        raise StepError(f"images={path!r} does not exist; give a PNG, a folder of PNGs or a .npy")
    if source.suffix == ".npy":
        names_of, array = lambda n: [f"{source.name}[{i}]" for i in range(n)], read_npy(source)
    else:
        files = sorted(source.glob("*.png")) if source.is_dir() else [source]
        if not files:
            raise StepError(f"images={path!r}: the folder holds no .png files")
        names_of, array = lambda n: [f.name for f in files], [read_png(f) for f in files]
    try:
        pixels = to_images(array)
    except ValueError as exc:
        raise StepError(f"images={path!r}: {exc}") from None
    return names_of(len(pixels)), pixels


def npy_header(path: Path):
    """(shape, dtype, fortran order, where the data starts) of an .npy file, refused unless
    its header is one of a plain array the file really holds (a forged header could ask
    for any amount of memory)."""
    import numpy as np

    headers = {(1, 0): np.lib.format.read_array_header_1_0,
               (2, 0): np.lib.format.read_array_header_2_0}
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version not in headers:
                raise ValueError(f"format version {version[0]}.{version[1]}")
            shape, fortran, dtype = headers[version](f)
            start = f.tell()
            body = path.stat().st_size - start
    except (ValueError, OSError) as exc:
        raise StepError(f"images={str(path)!r} is not a plain .npy array ({exc})") from None
    needed = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize if not dtype.hasobject else -1
    if needed != body:
        claims = f"{needed / 2**30:.1f} GiB" if needed >= 2**30 else f"{needed} bytes"
        raise StepError(f"images={str(path)!r}: its header claims {shape} {dtype} ({claims}) "
                        f"but the file holds {body} bytes of data; not a whole .npy array"
                        if needed >= 0 else f"images={str(path)!r} holds Python objects, not "
                        "pixels (only plain numeric .npy arrays are read)")
    return shape, dtype, fortran, start


def read_npy(path: Path):
    """The array in an .npy file whose header :func:`npy_header` accepts."""
    import numpy as np

    npy_header(path)
    return np.load(path, allow_pickle=False)


def npy_chunks(path: Path, chunk: int):
    """(first index, array of up to ``chunk`` images) over an .npy file, read from the file
    a chunk at a time: the process holds one chunk, whatever the file's size."""
    import numpy as np

    shape, dtype, fortran, start = npy_header(path)
    if fortran or len(shape) < 2:  # a layout chunks cannot be cut from: all at once
        yield 0, read_npy(path)
        return
    per_image = int(np.prod(shape[1:], dtype=np.int64))
    with open(path, "rb") as f:
        f.seek(start)
        for first in range(0, shape[0], chunk):
            n = min(chunk, shape[0] - first)
            yield first, np.fromfile(f, dtype, count=n * per_image).reshape(n, *shape[1:])


def read_png(path: Path, content: bytes | None = None):
    """One PNG as uint8 (28, 28): from ``path``, or from its ``content`` where the file was
    read elsewhere (a Spark executor gets the bytes; ``path`` then only names it)."""
    import warnings

    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():  # PIL's warning of a big image: refused below anyway
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path if content is None else io.BytesIO(content)) as image:
                if image.width * image.height > MAX_PNG_PIXELS:
                    raise StepError(f"images: {path} is {image.width}x{image.height} pixels, "
                                    "too large for a digit image (over "
                                    f"{MAX_PNG_PIXELS // 2**20} megapixels); scale it down")
                gray = image.convert("L").resize((28, 28), Image.Resampling.BILINEAR)
    except Image.DecompressionBombError as exc:  # so large that PIL will not even open it
        raise StepError(f"images: {path} is too large for a digit image ({exc})") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise StepError(f"images: {path} is not a readable image ({exc})") from None
    pixels = np.asarray(gray, dtype=np.uint8)
    return 255 - pixels if pixels.mean() > 127 else pixels
