"""The JSON error of the HTTP service, and how a refused or unreadable image maps to one.

Every error response has the body ``{"error": KIND, "status": CODE, "detail": MESSAGE}`` (plus
``"limit": {"name", "value", "allowed"}`` when a configured limit refused the request), whatever
refused it: the request reader, the image decoder, the model replica or the framework (404, 405).
"""

from __future__ import annotations

from typing import Any

from PIL import UnidentifiedImageError

from ..data.io import ImageLimitError
from ..data.layout import ImageReadError

#: HTTP status of each :class:`~mapl_ray.data.io.DecodeLimits` field that can refuse an image:
#: too many pixels is a request too large to process (413); a size or frame count the model
#: cannot score meaningfully is a well-formed but unprocessable image (422).
LIMIT_STATUS = {"max_pixels": 413, "min_side": 422, "max_aspect": 422, "animated": 422}


class ApiError(Exception):
    """A request the service refuses or cannot answer, carried to the JSON error response.

    Args:
        status: HTTP status (4xx: the client's request; 5xx: the service).
        kind: short machine-readable name (``not_an_image``, ``body_too_large``, ``timeout``...).
        detail: a sentence for a person: what was wrong and what is expected.
        limit: ``(name, value, allowed)`` of the configured limit that refused the request.
        headers: extra response headers (``Retry-After`` on 503, ``WWW-Authenticate`` on 401).
    """

    def __init__(
        self,
        status: int,
        kind: str,
        detail: str,
        *,
        limit: tuple[str, Any, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status, self.kind, self.detail, self.limit = int(status), kind, detail, limit
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        """The JSON body: ``error``, ``status``, ``detail`` and ``limit`` when a limit refused it."""
        out: dict[str, Any] = {"error": self.kind, "status": self.status, "detail": self.detail}
        if self.limit is not None:
            name, value, allowed = self.limit
            out["limit"] = {"name": name, "value": value, "allowed": allowed}
        return out

    def prefixed(self, prefix: str) -> ApiError:
        """The same error with ``prefix`` before its detail (which image of a batch it was)."""
        return ApiError(self.status, self.kind, f"{prefix}{self.detail}", limit=self.limit, headers=self.headers)


def decode_error(exc: ImageReadError) -> ApiError:
    """The 4xx for an image the decoder refused or could not read.

    :class:`~mapl_ray.data.io.ImageLimitError` -> :data:`LIMIT_STATUS` (``too_many_pixels`` 413,
    ``image_too_small`` / ``bad_aspect_ratio`` / ``animated_image`` 422); an empty body ->
    ``empty_image`` 400; bytes Pillow does not recognise -> ``not_an_image`` 400; anything else
    (truncated, corrupt) -> ``corrupt_image`` 400. The message names the image and the reason.
    """
    if isinstance(exc, ImageLimitError):
        kind = {
            "max_pixels": "too_many_pixels",
            "min_side": "image_too_small",
            "max_aspect": "bad_aspect_ratio",
            "animated": "animated_image",
        }[exc.limit]
        return ApiError(LIMIT_STATUS[exc.limit], kind, str(exc), limit=(exc.limit, exc.value, exc.allowed))
    if exc.__cause__ is None and exc.reason.startswith("empty"):
        return ApiError(400, "empty_image", str(exc))
    if isinstance(exc.__cause__, UnidentifiedImageError):
        return ApiError(400, "not_an_image", f"{exc} (send the bytes of a PNG, JPEG, BMP, TIFF or WebP file)")
    return ApiError(400, "corrupt_image", f"{exc} (the file is truncated or damaged)")
