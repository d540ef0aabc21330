"""Checks a silo runs on every request before its model sees it: counts, digests, image limits, text.

Each check raises `SiloError(INVALID_ARGUMENT, ...)` naming the offending
field and index, so a caller can fix the request from the message alone.
Images are decoded here, once per request: the header's size is checked
against the per-image and per-request pixel limits before any pixel is
decoded (a 100-byte PNG can declare a gigapixel image), and anything PIL
fails on while decoding is refused rather than passed on. Only PNG and JPEG
are opened: other formats PIL knows decode pixels before the size can be
checked (ICO holds a whole PNG) or hand the caller's bytes to other programs
(EPS goes to Ghostscript).
"""

from __future__ import annotations

import io
import math
import re
import warnings
from collections.abc import Sequence

from PIL import Image

from mor_secure.models.images import KeyedImage
from mor_secure.policy import RequestLimits
from mor_secure.wire.errors import ErrorCode, SiloError, invalid
from mor_secure.wire.messages import OBJECTIVES, ImageBlob, sha256_hex

# The image formats a caller may send (PIL format names); see the module docstring for why no others.
IMAGE_FORMATS = ("PNG", "JPEG")
_MEMORY_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def check_objective(objective: str, allowed: frozenset[str]) -> str:
    """A request names a known objective (INVALID_ARGUMENT otherwise) that the policy allows (PERMISSION_DENIED)."""
    if objective not in OBJECTIVES:
        raise invalid(f"objective {objective!r:.80} is not one this consortium knows; name one of {sorted(OBJECTIVES)}")
    if objective not in allowed:
        raise SiloError(ErrorCode.PERMISSION_DENIED, f"this silo's policy does not allow its model to be used for "
                        f"{objective!r:.80} (allowed: {', '.join(sorted(allowed)) or 'nothing'})")
    return objective


def check_weights(weights: Sequence[float], rows: int, max_weight: float) -> tuple[float, ...] | None:
    """None (no weights), or one finite weight in [0, max_weight] per row (INVALID_ARGUMENT / PERMISSION_DENIED).

    No weights is weight 1 on every row, so it too is refused under a cap below 1.
    """
    if not weights:
        if max_weight < 1:
            raise SiloError(ErrorCode.PERMISSION_DENIED, f"a request without weights gives this silo's score "
                            f"weight 1 on every row; this silo's policy allows at most {max_weight:g}: send one "
                            "weight per row")
        return None
    if len(weights) != rows:
        raise invalid(f"{len(weights)} weights for {rows} rows; send one weight per row, or none")
    for index, weight in enumerate(weights):
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise invalid(f"weights[{index}] is {weight!r}; a weight must be a finite number >= 0")
        if weight > max_weight:
            raise SiloError(ErrorCode.PERMISSION_DENIED, f"weights[{index}] is {weight:g}; this silo's policy "
                            f"allows its score a weight of at most {max_weight:g} on any row")
    return tuple(float(w) for w in weights)


def check_count(label: str, count: int, limit: int) -> None:
    """At least one, at most `limit`."""
    if count == 0:
        raise invalid(f"{label} is empty: send at least one")
    check_at_most(label, count, limit)


def check_at_most(label: str, count: int, limit: int) -> None:
    """At most `limit` (INVALID_ARGUMENT)."""
    if count > limit:
        raise invalid(f"{count} {label} in one request; this silo's policy allows at most {limit} "
                      "(split the request)")


def decode_images(blobs: Sequence[ImageBlob], limits: RequestLimits) -> list[KeyedImage]:
    """Every image checked (digest, bytes, pixels, decodability) and decoded to RGB, in request order."""
    check_count("images", len(blobs), limits.max_images)
    seen: set[str] = set()
    decoded = []
    request_pixels = 0
    for index, blob in enumerate(blobs):
        if len(blob.data) == 0:
            raise invalid(f"images[{index}] is empty")
        if len(blob.data) > limits.max_image_bytes:
            raise invalid(f"images[{index}] is {len(blob.data)} bytes; this silo's policy allows at most "
                          f"{limits.max_image_bytes}")
        if sha256_hex(blob.data) != blob.sha256.lower():
            raise invalid(f"images[{index}]: sha256 does not match its bytes (corrupted or mislabelled image)")
        if blob.sha256.lower() in seen:
            raise invalid(f"images[{index}] repeats an earlier image; send each distinct image once and refer "
                          "to it by index")
        seen.add(blob.sha256.lower())
        image, request_pixels = _decode(index, blob.data, limits, request_pixels)
        decoded.append(KeyedImage(sha256=blob.sha256.lower(), image=image))
    return decoded


def _decode(index: int, data: bytes, limits: RequestLimits, request_pixels: int) -> tuple[Image.Image, int]:
    """The image in RGB, and the request's decoded pixels with it; both pixel limits are checked first."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
                width, height = image.size
                if width * height > limits.max_image_pixels:
                    raise invalid(f"images[{index}] is {width}x{height} pixels; this silo's policy allows at most "
                                  f"{limits.max_image_pixels} pixels")
                request_pixels += width * height
                if request_pixels > limits.max_request_pixels:
                    raise invalid(f"images[{index}] brings the request to {request_pixels} decoded pixels; this "
                                  f"silo's policy allows at most {limits.max_request_pixels} (split the request)")
                return image.convert("RGB"), request_pixels
    except SiloError:
        raise
    # Whatever PIL raises on the caller's bytes means "not an image we take": it varies by format and
    # version (UnidentifiedImageError, ValueError, SyntaxError, EOFError ..., and an AssertionError from
    # convert() for a palette PNG without its palette), so every exception here is the caller's input.
    except Exception as exc:  # noqa: BLE001
        # Without the " at 0x..." of an object's repr (PIL names its BytesIO): an address of this process has no
        # place in a caller's error or in the audit log.
        reason = f"{type(exc).__name__}: {_MEMORY_ADDRESS.sub('', str(exc))}" if str(exc) else type(exc).__name__
        raise invalid(f"images[{index}] could not be decoded as an image ({reason})") from None


def check_text(label: str, index: int, text: str, limits: RequestLimits, reserved: Sequence[str] = ()) -> str:
    """A non-empty, non-blank string of at most `max_text_chars`, holding none of `reserved`; returned unchanged."""
    if not isinstance(text, str) or not text.strip():
        raise invalid(f"{label}[{index}] is empty; every {label[:-1] if label.endswith('s') else label} needs text")
    if len(text) > limits.max_text_chars:
        raise invalid(f"{label}[{index}] is {len(text)} characters; this silo's policy allows at most "
                      f"{limits.max_text_chars}")
    for token in reserved:
        if token in text:
            raise invalid(f"{label}[{index}] contains {token!r}, a control token of this silo's model; remove it "
                          "from the text")
    return text


def check_image_index(label: str, index: int, image: int, images: int) -> int:
    """A row's image index must name one of the request's images."""
    if isinstance(image, bool) or not isinstance(image, int) or not 0 <= image < images:
        raise invalid(f"{label}[{index}].image is {image!r}; the request has images 0..{images - 1}")
    return image


def check_all_images_used(used: set[int], images: int) -> None:
    """An image no row refers to is a wasted upload, or a sign the rows were built wrong."""
    unused = sorted(set(range(images)) - used)
    if unused:
        raise invalid(f"images {unused[:10]} are not referred to by any row; send only the images the rows use")


def check_epsilon(epsilon: float | None) -> float | None:
    """A randomized-response epsilon must be finite and positive when given."""
    if epsilon is None:
        return None
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not math.isfinite(epsilon) or epsilon <= 0:
        raise invalid(f"randomized_response_epsilon must be a finite number > 0, got {epsilon!r}")
    return float(epsilon)
