"""Digit images from files: a PNG, a folder of PNGs or an ``.npy`` array, as ``predict``
and ``score`` read them. Anything that is not digit images is refused in one line naming
``images`` (a StepError), before a model is loaded or a Spark job started.

PNGs are read as grayscale and resized to 28x28. MNIST digits are light on dark; an image
whose background is light (mean above mid-grey) is inverted, as a drawing usually is.
"""

from __future__ import annotations

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


def read_npy(path: Path):
    """The array in an .npy file, refused unless its header is one of a plain array the
    file really holds (a forged header could ask for any amount of memory)."""
    import numpy as np

    headers = {(1, 0): np.lib.format.read_array_header_1_0,
               (2, 0): np.lib.format.read_array_header_2_0}
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version not in headers:
                raise ValueError(f"format version {version[0]}.{version[1]}")
            shape, _, dtype = headers[version](f)
            body = path.stat().st_size - f.tell()
    except (ValueError, OSError) as exc:
        raise StepError(f"images={str(path)!r} is not a plain .npy array ({exc})") from None
    needed = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize if not dtype.hasobject else -1
    if needed != body:
        claims = f"{needed / 2**30:.1f} GiB" if needed >= 2**30 else f"{needed} bytes"
        raise StepError(f"images={str(path)!r}: its header claims {shape} {dtype} ({claims}) "
                        f"but the file holds {body} bytes of data; not a whole .npy array"
                        if needed >= 0 else f"images={str(path)!r} holds Python objects, not "
                        "pixels (only plain numeric .npy arrays are read)")
    return np.load(path, allow_pickle=False)


def read_png(path: Path):
    import warnings

    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():  # PIL's warning of a big image: refused below anyway
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
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
